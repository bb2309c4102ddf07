"""End-to-end tests: the real openai and LangChain clients through a real gateway and emulator."""
