"""Everything that talks to the broker (Celery over Redis): the app, chunk messages, a job's window, the reconciler.

``app`` builds the Celery app from settings; ``publish`` sends ``(idx, input)`` chunks as messages;
``window`` keeps a few slices of each job on the broker and moves them on as workers finish;
``reconcile`` queues again what a stalled job still has pending. The store, not the broker, is the
record of what is left to do.
"""
