"""Defaults, limits and names in one place."""

#: Broker used when neither PIPEQ_BROKER_URL nor --broker-url is given.
DEFAULT_BROKER_URL = "redis://localhost:6379/0"
#: Store used when neither PIPEQ_DATABASE_URL nor --database-url is given (embedded SQLite).
DEFAULT_DATABASE_URL = "sqlite:///pipeq.db"

#: Items per broker message when no live worker has measured its speed yet (and the fewest a fast
#: worker gets): a million-item job is ~4,000 messages, not a million.
DEFAULT_CHUNK_SIZE = 256
#: Seconds of a worker's measured speed one message holds (unless --chunk-size says otherwise): a
#: message's fixed costs (delivery, claim, the first batch's tokenization, the last one's commit)
#: stay a small share of it, while cancellation and fair sharing stay within seconds.
CHUNK_SECONDS = 1.0
#: Most items one message holds when sized from the workers' speed.
MAX_CHUNK_SIZE = 4096
#: A warm-up pass shorter than this is run a second time to measure the worker's speed (shapes warm).
WARMUP_SPEED_PASS_SECONDS = 3.0
#: How much faster a CPU worker's warm-up must run with one torch thread fewer to keep it that way
#: (this machine's speed drifts 10-30% within minutes: a smaller margin picks noise).
FEWER_THREADS_GAIN = 1.15
#: A CPU worker tries one torch thread fewer only when its warm-up (both passes) took less than this:
#: a slower model is bound by its forward pass, which needs every core.
THREAD_TRIAL_MAX_SECONDS = 2.0
#: Seconds of chunks a worker must have run before its own running speed replaces its warm-up's.
SPEED_MIN_BUSY_SECONDS = 5.0
#: Fewest items per broker message when a small job is spread over the live workers.
MIN_CHUNK_SIZE = 16
#: Messages per live worker a job is cut into at least (so small jobs spread evenly).
CHUNKS_PER_WORKER = 4
#: Padded tokens (rows x longest row) allowed in one forward pass.
DEFAULT_MAX_BATCH_TOKENS = 8192
#: Most threads the fast tokenizer gets per worker child on an accelerator (``--tokenizer-threads``).
MAX_TOKENIZER_THREADS = 8
#: A CUDA worker without ``--concurrency`` runs several children (model copies) only for weights up to this
#: size on disk: a small model's forward pass leaves the GPU idle while one child's Python runs (worker/children.py).
SMALL_MODEL_BYTES = 2**30
#: Most children such a worker runs by default on one GPU.
MAX_GPU_CHILDREN = 4
#: Host cores per default child on a GPU: its own Python thread and its tokenizer's threads.
CORES_PER_GPU_CHILD = 4
#: Device memory per default child besides twice its weights: the CUDA context, activations, the allocator's cache.
GPU_CHILD_OVERHEAD_BYTES = 2 * 2**30
#: Share of the device's memory the default children may take together.
GPU_MEMORY_SHARE = 0.8
#: Most forward streams a CPU child runs by default (one per torch thread up to this many, then threads shared
#: among them): each stream's Python between operators holds the GIL, so very many streams would queue on it.
MAX_CPU_STREAMS = 8
#: Rows allowed in one forward pass, whatever their length.
DEFAULT_MAX_BATCH_SIZE = 64
#: Token budgets ``pipeq worker --calibrate`` tries (each capped at max batch size x the model's maximum length).
CALIBRATION_BUDGETS = (1024, 2048, 4096, 8192, 16384)
#: Longest text accepted at submit, in characters (a 1 MB text is refused at the door).
DEFAULT_MAX_TEXT_CHARS = 100_000
#: Longest item id the store keeps (``items.input_id`` is a VARCHAR(255)).
MAX_INPUT_ID_CHARS = 255
#: Most items one job may hold.
DEFAULT_MAX_JOB_ITEMS = 10_000_000
#: Job priorities: 0 (default) to 9, higher first.
MIN_PRIORITY = 0
MAX_PRIORITY = 9
#: Rows written to SQL per INSERT while a job is stored: each page is its own short transaction, so a
#: large submit never holds SQLite's write lock for long (workers claim, write and beat meanwhile).
INSERT_BATCH_ROWS = 5_000
#: Characters of text at most in one such page (a page of long texts is cut sooner).
INSERT_BATCH_CHARS = 8_000_000
#: Records of a text-generation job whose prompts are tokenized in one call at submit (to check them
#: against the model's context): one call a page keeps the check fast, a page at a time keeps memory flat.
PROMPT_CHECK_RECORDS = 1_000
#: A job of at least this many items has the store's statistics refreshed once it is stored (PostgreSQL
#: ``ANALYZE items``): the planner must know a job is large to look its items up by key (``Store.create_job``).
ANALYZE_AFTER_ITEMS = 10_000
#: How long that ANALYZE waits for a lock (autovacuum may hold it) before it leaves the table to autovacuum.
ANALYZE_LOCK_TIMEOUT_MS = 2_000

#: Celery task name that runs one chunk of a job (producers publish by name, never import it).
CHUNK_TASK_NAME = "pipeq.run_chunk"
#: Prefix of every queue pipeq publishes to; the rest names the served configuration.
QUEUE_PREFIX = "pipeq"
#: Seconds an unacknowledged Redis message stays invisible before it is redelivered.
DEFAULT_VISIBILITY_TIMEOUT = 3600
#: Seconds to connect to the broker and hear its PING before ``submit``, ``worker`` and ``demo`` say
#: that nothing answers (instead of Celery's minute of connection retries).
BROKER_PROBE_TIMEOUT = 2.0
#: Seconds a private broker (``pipeq demo`` with no Redis) may take to answer after it is started.
PRIVATE_BROKER_START_TIMEOUT = 30.0
#: Seconds a private broker gets to exit after SIGTERM before it is killed.
PRIVATE_BROKER_STOP_TIMEOUT = 5.0
#: Ports tried for a private broker (a free port can be taken between choosing it and binding it).
PRIVATE_BROKER_TRIES = 3

#: Seconds a non-final job may go without any progress, while its queue is idle, before the
#: reconciler queues its pending items again (the broker lost them, or a producer died mid-publish).
DEFAULT_STALLED_AFTER = 300.0
#: Seconds between a worker's reconciler passes over its own queue.
DEFAULT_RECONCILE_INTERVAL = 60.0
#: Seconds a job with pending items may go without progress while its queue holds no message on the
#: broker and no live worker has claimed any of them, before its window is published again: the
#: broker lost its messages (Redis restarted without persistence, flushed) or a publish failed. A
#: message takes about ``CHUNK_SECONDS`` to run and commits each batch, so this is many messages' time.
DEFAULT_LOST_AFTER = 15.0
#: A worker looks for such jobs on its queue this many times per ``lost_after``.
LOST_CHECKS_PER_LOST_AFTER = 3
#: Seconds the broker may take to answer how many messages a queue holds (the look must never hang a worker).
QUEUE_DEPTH_TIMEOUT = 5.0
#: Seconds a worker retries an unreachable store (with backoff) before handing its message back.
DEFAULT_STORE_RETRY_BUDGET = 300.0
#: Longest pause between two tries of an unreachable store.
STORE_RETRY_MAX_SLEEP = 10.0

#: Seconds between a worker's heartbeats in the store (shorter where ``dead_after`` needs it).
HEARTBEAT_INTERVAL = 10.0
#: Seconds without a heartbeat after which a live worker on the same queue declares a worker lost
#: and queues its claimed, still-pending items again (see ``pipeq.broker.reconcile.take_over``).
DEFAULT_DEAD_AFTER = 30.0
#: Heartbeats a worker sends within ``dead_after`` at least, so that one late beat is not a death.
HEARTBEATS_PER_DEAD_AFTER = 3
WORKER_LOST = "lost"
#: A worker's status once the weights under its model path changed after it loaded them: it runs nothing more.
WORKER_STALE = "stale"
#: Seconds a worker whose model revision is not a job's waits before it hands that job's message back to the
#: queue for a worker that has it (so the message does not spin between them).
STEP_ASIDE_PAUSE = 1.0
#: Seconds after which a worker without a heartbeat counts as gone.
HEARTBEAT_STALE_AFTER = 60.0
#: Seconds between polls of the store while waiting for a job.
WAIT_POLL_INTERVAL = 0.5
#: Shortest wait between two reads when a job is about to finish (a waiting client then reads a little more
#: often, so ``pipeq submit --wait`` returns within this of the job's last result, not within a full poll).
WAIT_POLL_MIN = 0.05

#: Item states.
ITEM_PENDING = "pending"
ITEM_DONE = "done"
ITEM_FAILED = "failed"
ITEM_CANCELLED = "cancelled"
ITEM_FINAL_STATES = (ITEM_DONE, ITEM_FAILED, ITEM_CANCELLED)

#: Job states. A job is "storing" while its producer writes its items (no worker can see it yet); one
#: left storing had its submit interrupted (``pipeq jobs`` says so; ``pipeq delete`` removes it).
JOB_STORING = "storing"
JOB_QUEUED = "queued"
JOB_RUNNING = "running"
JOB_DONE = "done"
JOB_CANCELLED = "cancelled"
JOB_FINAL_STATES = (JOB_DONE, JOB_CANCELLED)

#: Deliveries of one item before it is stored as failed (an input that kills the worker each time).
MAX_ATTEMPTS = 3
#: Environment a ``pipeq worker`` process starts torch with, unless already set. OpenMP threads that
#: sleep when idle instead of spinning: the worker's prepare and writer threads then get the cores
#: between forward passes (a near-free model ran 3,500 -> 4,550 texts/s on two cores; a MiniLM
#: forward-bound one within noise, 80.7 vs 82.0).
WORKER_ENVIRONMENT = {"OMP_WAIT_POLICY": "PASSIVE"}
#: Seconds between a starting worker's looks at whether its pool children are ready to take messages.
READY_POLL_INTERVAL = 0.5
#: Seconds a child process may take to load its model before Celery gives up on it.
PROCESS_START_TIMEOUT = 900.0

# --------------------------------------------------------- agreement with fp32 (auto's gate, shadow check)
#: Least share of items whose top label (entities, top token, generated text) a lower precision keeps.
DEFAULT_MIN_AGREEMENT = 0.99
#: fp32's top two probabilities closer than this are a tie: a flipped label there is not counted.
DEFAULT_LABEL_MARGIN = 0.05
#: Largest difference of a probability from fp32's a lower precision may make.
DEFAULT_MAX_SCORE_DIFF = 0.02
#: Least cosine of an embedding to fp32's, on every text.
DEFAULT_MIN_COSINE = 0.99
#: Share of a lower-precision worker's done items it also runs at fp32 to compare (``--shadow-fraction``).
DEFAULT_SHADOW_FRACTION = 0.01
#: Most items of one job the shadow check compares (``--shadow-max-items``): 1,000 bound a label agreement
#: of 99% within about 0.6 points (95% interval), and a large job would otherwise pay the fp32 runs on all of its 1%.
SHADOW_MAX_ITEMS = 1000
#: Sampled items the shadow check runs at fp32 in one batch.
SHADOW_BATCH = 32
#: Longest a sampled item waits for others to share its fp32 batch (so a job's figures land this soon after it).
SHADOW_SECONDS = 1.0
#: Sampled items that may wait for the shadow check before the writer thread waits for it.
SHADOW_BACKLOG = 512
#: Longest a stopping worker spends comparing the sampled items still waiting.
SHADOW_STOP_SECONDS = 30.0
#: Calibration texts shipped with pipeq (English and Chinese, uneven lengths), in ``pipeq/data``.
CALIBRATION_TEXTS_FILE = "calibration_texts.txt"
