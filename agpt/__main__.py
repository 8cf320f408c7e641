from agpt.cli import main

main()
