"""The embedded tasks' builds: each task's models trained from nothing by ``agents.sft`` and ``agents.reward_model``.

    python -m agents.build reviews --out DIR
    python -m agents.build arithmetic --out DIR
    python -m agents.build calculator --out DIR

The tasks' data, tokenizers and quality reports live with the tasks in ``textenv/``
(which ships the built artifacts); their builds live here because they train, and
``textenv`` never imports the learner side.
"""
