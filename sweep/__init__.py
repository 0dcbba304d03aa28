"""`fedlora-sweep`: grids of whole experiments as Ray tasks, with a results table, a report with CIs and plots."""
