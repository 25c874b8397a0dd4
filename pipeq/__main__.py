from pipeq.cli import main

main()
