"""``vhostfs guest-run``: run a command in a throw-away QEMU guest on a virtio-fs share.

Exit status: the command's own status; 124 if it timed out; 125 if the guest could not
be booted or the share not mounted, or if the command succeeded but the shutdown was not
clean (umount failed in the guest, or the backend did not exit with status 0 after QEMU
powered off); the message names the backend and QEMU logs;
130 on Ctrl-C, 143 on SIGTERM.  Everything started is killed on every path.
"""
from __future__ import annotations

import os
import shlex
import signal
import sys

import click

from vhostfs.guestrun.runner import GuestError, GuestRunner, GuestTimeout

EXIT_TIMEOUT = 124
EXIT_GUEST_ERROR = 125


class _Terminated(BaseException):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum, frame):  # noqa: ARG001
    raise _Terminated(signum)


def _echo(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--share", required=True, type=click.Path(exists=True, file_okay=False),
              help="Host directory served to the guest and mounted at /mnt (the command's cwd).")
@click.option("--tag", default="vhostfs", show_default=True, help="virtio-fs tag.")
@click.option("--kernel", type=click.Path(exists=True, dir_okay=False),
              help="Guest bzImage (default: the newest /boot/vmlinuz-*); modules come from "
                   "/lib/modules/<its version>, or from the package tree the bzImage was "
                   "extracted into (DIR/boot/vmlinuz-* with DIR/lib/modules/<version>).")
@click.option("--kernel-root", type=click.Path(exists=True, file_okay=False),
              help="An extracted kernel package (DIR/boot/vmlinuz-*, DIR/lib/modules/<version>), "
                   "e.g. the Debian backports kernel: "
                   "--kernel-root \"$(scripts/fetch-kernel-backports.sh)\".")
@click.option("--backend", default=lambda: os.environ.get("VHOSTFS_GUEST_BACKEND", "vhostfs"),
              show_default="vhostfs, or $VHOSTFS_GUEST_BACKEND",
              help="'vhostfs' (this daemon), 'virtiofsd' (QEMU's C reference) or a command template "
                   "with {socket} {shared_dir} {tag} {log_level} placeholders.")
@click.option("--log-level", default="info", show_default=True, help="Backend log level (vhostfs only).")
@click.option("--memory", default="1G", show_default=True, help="Guest RAM (memfd, share=on).")
@click.option("--smp", default=2, show_default=True, type=int, help="Guest CPUs.")
@click.option("--queue-size", default=1024, show_default=True, type=int, help="virtio-fs request queue size.")
@click.option("--mount-opts", default="", help="Extra options for mount -t virtiofs in the guest.")
@click.option("--timeout", default=600.0, show_default=True, type=float,
              help="Seconds for the whole run (boot included).")
@click.option("--pvh/--no-pvh", default=True, show_default=True,
              help="Boot the cached uncompressed vmlinux through PVH (faster under TCG).")
@click.option("--keep", is_flag=True, help="Keep the run directory (logs, initrd, QEMU argv).")
@click.option("--script", "script_file", type=click.File("r"),
              help="Run this shell script instead of CMD.")
@click.argument("cmd", nargs=-1, type=click.UNPROCESSED)
def guest_run(share, tag, kernel, kernel_root, backend, log_level, memory, smp, queue_size,
              mount_opts, timeout, pvh, keep, script_file, cmd):
    """Boot a guest, mount SHARE there (virtio-fs, at /mnt) and run CMD in it.

    One CMD word is a shell script (`-- 'ls -l; sha256sum *'`); several words are one
    command (`-- sha256sum big`).  Guest tools are busybox applets.  The guest's output
    is streamed to stdout and the exit status is the command's.
    """
    if script_file is not None:
        script = script_file.read()
    elif len(cmd) == 1:
        script = cmd[0]
    elif cmd:
        script = shlex.join(cmd)
    else:
        raise click.UsageError("give a command after --, or --script FILE")
    old = {s: signal.signal(s, _raise_terminated) for s in (signal.SIGTERM, signal.SIGHUP)}
    # Also when started in the background by a shell that ignores SIGINT there.
    old[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        runner = GuestRunner(share, tag=tag, kernel=kernel, kernel_root=kernel_root, backend=backend,
                             memory=memory, smp=smp, queue_size=queue_size, timeout=timeout,
                             log_level=log_level, pvh=pvh,
                             mount_opts=mount_opts, keep=keep, echo=_echo)
        result = runner.run(script)
    except GuestTimeout as exc:
        click.echo(f"vhostfs guest-run: timeout after {timeout:g} s: {exc}", err=True)
        sys.exit(EXIT_TIMEOUT)
    except (GuestError, FileNotFoundError, ValueError, KeyError) as exc:
        click.echo(f"vhostfs guest-run: {exc}", err=True)
        sys.exit(EXIT_GUEST_ERROR)
    except KeyboardInterrupt:
        click.echo("vhostfs guest-run: interrupted; guest and backend stopped", err=True)
        sys.exit(130)
    except _Terminated as exc:
        click.echo(f"vhostfs guest-run: signal {exc.signum}; guest and backend stopped", err=True)
        sys.exit(128 + exc.signum)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    down = result.shutdown
    if down is not None and (down.umount_status != 0 or down.backend_status != 0):
        click.echo(f"vhostfs guest-run: unclean shutdown (umount status {down.umount_status}, "
                   f"backend status {down.backend_status}); backend log: {result.backend_log}", err=True)
        sys.exit(result.status or EXIT_GUEST_ERROR)
    if result.status != 0:
        click.echo(f"vhostfs guest-run: command exited with status {result.status}; "
                   f"backend log: {result.backend_log}", err=True)
    elif keep:
        click.echo(f"vhostfs guest-run: run directory kept: {result.backend_log.parent}", err=True)
    sys.exit(result.status)
