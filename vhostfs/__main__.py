from vhostfs.cli import main

main()
