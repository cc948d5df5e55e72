"""What every process of hostqueue shares: job states and the transition table,
the rules that decide an attempt's outcome, task registration, the context a
task receives, settings, error codes, the pipe's framing and the progress board.
Nothing here starts a process or touches the store."""
