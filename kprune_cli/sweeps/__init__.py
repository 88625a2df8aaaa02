"""Many runs at once: finding their results, summary tables and plots, ``kprune compare``."""
