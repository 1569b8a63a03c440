"""Experiments made of several runs: an ablation of a recorded run (ablation), variants side by side in processes
of their own (bench), variants x seeds recorded as one study (study). The commands of the same names parse their
command lines and call these."""
