from otter_gguf.cli import main

main()
