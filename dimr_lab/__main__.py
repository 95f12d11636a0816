from dimr_lab.cli import main

main()
