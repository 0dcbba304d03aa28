"""Starts the processes of one experiment (air, BS, edges) by their entry points."""
