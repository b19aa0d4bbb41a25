from beit.cli import main

main()
