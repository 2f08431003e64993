from rebasin.cli import main

main()
