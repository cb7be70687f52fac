"""DriveSim-QA: driving questions with simulator-checked answers (highway-env + our own cameras)."""
