from awg_split_tunnel.cli import main

main()
