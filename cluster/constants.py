"""Scheduler-side numbers, each in one place."""

from renderfarm._constants import KEEPALIVE_TIME_S, KEEPALIVE_TIMEOUT_S, MAX_MESSAGE_BYTES

DEFAULT_PORT = 50051
# Prometheus metrics (/metrics) and the web page, each on a port of its own; None turns one off.
DEFAULT_METRICS_PORT = 9464
DEFAULT_WEB_PORT = 8090
# Live events: at most this often a denoiser reports a batch's steps (with no previews asked for), and this many
# unsent live events wait for one listener before the oldest are dropped (a slow client never holds memory).
STEP_REPORT_INTERVAL_S = 0.25
LIVE_EVENTS_PER_LISTENER = 256

# Defaults for a sweep's unset axes: diffusers' StableDiffusionPipeline defaults.
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE_SCALE = 7.5
DEFAULT_SEED = 0
# ... and StableDiffusionUpscalePipeline's.
DEFAULT_UPSCALE_STEPS = 75
DEFAULT_UPSCALE_GUIDANCE_SCALE = 9.0
DEFAULT_NOISE_LEVEL = 20
# ... and StableDiffusionImg2ImgPipeline's and StableDiffusionInpaintPipeline's.
DEFAULT_IMG2IMG_STRENGTH = 0.8
DEFAULT_INPAINT_STRENGTH = 1.0
UPSCALE_FACTOR = 4
# Upscale tiles align to the UNet's deepest downsampling (8 covers SD's x4 upscaler).
TILE_MULTIPLE = 8
# The upscaler replicas that share an image's windows meet once per GroupNorm. The first meeting
# waits for every party to start, after whatever its replica runs before it (another image);
# later ones only for the other parties' UNet between two GroupNorms. Past these, the image fails.
EXCHANGE_JOIN_TIMEOUT_S = 3600.0
EXCHANGE_ROUND_TIMEOUT_S = 600.0

# Seeds are torch.Generator seeds: any value in [0, 2**64) would do, but JSON
# readers of the embedded spec (JavaScript among them) lose precision past 2**53.
MAX_SEED = 2**53 - 1
# Images are made of 8x8 latent cells.
SIZE_MULTIPLE = 8

# What an img2img or inpaint request carries besides its images (model, prompts, settings), at the
# least: LimitsConfig.max_request_bytes must leave this much over max_source_bytes.
REQUEST_BYTES_BESIDES_SOURCES = 1024 * 1024

# Job ids and client-chosen request ids: short, and safe in a file name, a URL or a log line.
SAFE_ID_PATTERN = r"[A-Za-z0-9_-]{1,64}"
# A model reference is at most a path; Linux's PATH_MAX bounds what a file system call accepts.
MAX_MODEL_REF_CHARS = 4096

# Jobs a ListJobs reply holds, by default and at most; each listed without its lists, so a reply stays small.
DEFAULT_LIST_PAGE = 100
MAX_LIST_PAGE = 1000

# Batches in flight per replica: one running, one queued behind it, so a replica
# never idles while the scheduler plans.
BATCHES_IN_FLIGHT_PER_REPLICA = 2
# Models a replica keeps loaded at once; the least recently used is dropped first.
# The scheduler mirrors this to send a batch where its model already is.
MODELS_PER_REPLICA = 2
# Text embeddings (refs into Ray's object store) the scheduler keeps for reuse across jobs.
TEXT_CACHE_ENTRIES = 4096
# Encoded img2img and inpaint sources (refs) the scheduler keeps, so each is encoded once for all its images.
SOURCE_CACHE_ENTRIES = 256
# How long a node-liveness or cluster check may take before the cluster counts as gone.
CLUSTER_CHECK_TIMEOUT_S = 20.0

# How long stage replicas may take to start (a cold start imports torch and may
# build a builtin model) before the farm reports that they cannot be placed.
REPLICAS_READY_TIMEOUT_S = 300.0

# The graceful-stop window of the gRPC server.
SHUTDOWN_GRACE_S = 5.0

# The server pings idle clients less often than they ping it: it only needs to
# free the streams of clients that vanished.
SERVER_KEEPALIVE_TIME_S = 60
# Results are large: replies may be as large as the SDK reads. What the server reads is the farm's
# LimitsConfig.max_request_bytes, which Farm.start adds.
SERVER_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", SERVER_KEEPALIVE_TIME_S * 1000),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_S * 1000),
    # A server by default answers pings more often than every 5 minutes with GOAWAY
    # (too_many_pings); accept the SDK's, with slack for timer jitter.
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_S * 1000 // 2),
    ("grpc.keepalive_permit_without_calls", 1),
)
# gRPC clients refuse trailers over 8 KiB (at random from there to 16 KiB). An error's message goes in them
# more than once: percent-encoded in grpc-message, base64 in the Status, with a field violation's copy.
# rpc.abort cuts a message whose copies would pass this, leaving room for the other trailers.
MAX_ERROR_MESSAGE_WIRE_BYTES = 6 * 1024

# An object store's manifest.jsonl (S3 has no append) is rewritten from the results index at most
# this often while its job runs, and once more when it ends.
MANIFEST_REWRITE_INTERVAL_S = 5.0
# How often finished jobs past retention_days are looked for (and once at start).
RETENTION_CHECK_INTERVAL_S = 3600.0

# max_images_per_day's rolling window; retention_days count in these too.
DAY_S = 24 * 60 * 60
