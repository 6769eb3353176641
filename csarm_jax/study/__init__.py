"""The reproduction study (runner) and its report."""
