"""`riverbed bench ...`: measurements made side by side in one run, reported as ratios."""
