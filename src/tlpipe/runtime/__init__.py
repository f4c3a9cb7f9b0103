"""What a stage process runs on: its errors and exit codes (errors), logging and progress bars (log),
TensorFlow's fixed thread pool (threads), the CPU's features (cpu), and the start-up that sets them (startup)."""
