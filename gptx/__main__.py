"""`python -m gptx` runs the `gptx` command."""

from gptx.launcher import main

main()
