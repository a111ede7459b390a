"""``python -m vhostfs.guestrun ...`` = ``vhostfs guest-run ...``."""
from vhostfs.guestrun.cli import guest_run

guest_run(prog_name="vhostfs guest-run")
