"""Adaptive checking (SPEC §11): every watched section on its own due time, within budgets every daemon shares.

* ``replanner``: the planning loop; Postgres in (who waits where), the plan out (intervals, priorities, due
  times in ``seatwatch_adaptive_plan``);
* ``taker``: leases due sections from Postgres, reserves their scrape slots from the shared pace in Redis (one
  script call per many checks), and runs the checks;
* ``plan`` and ``limit``: pure logic, the intervals within the budgets and the auto concurrency limit;
* ``gate``: the in-flight gate in front of the scraper; ``figures``: timing, keys and what health reads.

Nothing here imports the cron mode (``daemon.cron``), and the cron mode imports nothing from here; the wiring
shares the gate and the limit with the cron mode's checks.
"""
