"""From a command to a finished run, one module per job: a new run's settings from plain values
(settings_source), a job trained in this process (jobs), a job in a process of its own (children), what a person
sees (view). The training itself is ``core.loop.Trainer``."""
