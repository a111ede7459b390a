"""Command line: click options -> Config -> Daemon.  No logic lives here.

`vhostfs --socket-path PATH --shared-dir DIR [options]` serves a directory to one
vhost-user frontend (QEMU); `vhostfs guest-run ...` boots a throw-away guest on a share.
Option names are virtiofsd's where the feature is the same.
"""
from __future__ import annotations

import os
import sys

import click

from vhostfs import __version__
from vhostfs.config import CACHE_POLICIES, LOG_LEVELS, Config, parse_size
from vhostfs.errors import ConfigError
from vhostfs.guestrun.cli import guest_run


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--socket-path", type=click.Path(dir_okay=False), help="vhost-user socket to listen on (created).")
@click.option("--fd", type=int, help="File descriptor of an already listening vhost-user socket.")
@click.option("--shared-dir", type=click.Path(file_okay=False), help="Host directory to share with the guest.")
@click.option("--tag", help="virtio-fs tag the guest mounts (answers GET_CONFIG; needed by generic vhost-user devices).")
@click.option("--log-level", type=click.Choice(LOG_LEVELS), default="info", show_default=True)
@click.option("--log-format", type=click.Choice(["console", "json"]), default="console", show_default=True)
@click.option("--thread-pool-size", type=int, default=4, show_default=True,
              help="Worker threads per request queue (0 = serve on the queue thread).")
@click.option("--cache", type=click.Choice(CACHE_POLICIES), default="auto", show_default=True,
              help="Guest caching policy for metadata and data.")
@click.option("--readonly", is_flag=True, help="Refuse every request that would modify the shared directory.")
@click.option("--dax-window", metavar="SIZE", default=None,
              help="DAX cache window size (e.g. 64M; a multiple of 2 MiB); needs QEMU 11.1's "
              "vhost-user-test-device-pci.")
@click.option("--dax-shmem-bit", type=click.Choice(["21", "22"]), default="22", show_default=True,
              help="SHMEM protocol feature bit: 22 (QEMU 11.1, crosvm) or 21 (rust-vmm 0.16, alioth).")
@click.option("--dax-inode-min-size", metavar="SIZE", default="0", show_default=True,
              help="With -o dax=inode: files of at least SIZE bytes use DAX.")
@click.version_option(__version__, "-V", "--version")
@click.pass_context
def main(ctx, socket_path, fd, shared_dir, tag, log_level, log_format, thread_pool_size, cache, readonly,
         dax_window, dax_shmem_bit, dax_inode_min_size):
    """Serve SHARED_DIR to a QEMU guest as a virtio-fs device (vhost-user backend)."""
    if ctx.invoked_subcommand is not None:
        return
    from vhostfs import log
    from vhostfs.runtime.daemon import Daemon

    log.configure(log_level if log_level != "trace" else "debug", log_format)
    if shared_dir is None:
        raise click.UsageError("--shared-dir is required")
    if not os.path.isdir(shared_dir):
        raise click.BadParameter(f"{shared_dir!r} is not a directory", param_hint="--shared-dir")
    try:
        config = Config(
            shared_dir=os.path.abspath(shared_dir), socket_path=socket_path, fd=fd, tag=tag,
            log_level=log_level, log_format=log_format, thread_pool_size=thread_pool_size,
            cache=cache, readonly=readonly,
            dax_window=parse_size(dax_window) if dax_window else 0, dax_shmem_bit=int(dax_shmem_bit),
            dax_inode_min_size=parse_size(dax_inode_min_size),
        ).validate()
        sys.exit(Daemon(config).run())
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    except OSError as exc:
        # Set-up failures (socket path, shared dir) name the file at fault.
        click.echo(f"vhostfs: {exc}", err=True)
        sys.exit(1)


main.add_command(guest_run, "guest-run")
