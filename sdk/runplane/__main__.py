from runplane._cli import main

main()
