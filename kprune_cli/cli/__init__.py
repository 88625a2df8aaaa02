"""The commands: one module per ``kprune <command>`` (argv, Hydra apps, exit codes, what is printed).

``main`` dispatches; ``run``, ``finetune``, ``evaluate``, ``bench``, ``export``, ``compare`` and
``summarize`` each hold one command. Nothing below this layer imports it.
"""
