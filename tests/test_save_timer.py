"""When the jobs save progress: every N steps when asked, else by time, the saves kept to a share of the stage."""

import time

from influence_jax.jobs.workdir import SaveTimer


def test_time_driven_saves_take_at_most_their_share_of_the_stage():
  timer = SaveTimer(every=0, seconds=0.0, max_share=0.2)
  step, stop = 0, time.monotonic() + 1.5
  while time.monotonic() < stop:
    step += 1
    time.sleep(0.001)
    if timer.due(step):
      timer.save(lambda: time.sleep(0.03))
  share = timer.save_seconds / (time.monotonic() - timer.start)
  assert timer.saves >= 5 and share <= 0.2 + 0.03, (timer.saves, share)  # Unbounded, it would be ~0.95.


def test_count_driven_saves_happen_every_n_steps_whatever_they_cost():
  timer, saved = SaveTimer(every=2, seconds=1e6, max_share=0.01), []
  for step in range(1, 9):
    if timer.due(step):
      timer.save(lambda: time.sleep(0.02))
      saved.append(step)
  assert saved == [2, 4, 6, 8]
