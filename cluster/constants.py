"""Scheduler-side numbers, each in one place."""

DEFAULT_PORT = 50051

# Defaults for a sweep's unset axes: diffusers' StableDiffusionPipeline defaults.
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE_SCALE = 7.5
DEFAULT_SEED = 0
# ... and StableDiffusionUpscalePipeline's.
DEFAULT_UPSCALE_STEPS = 75
DEFAULT_UPSCALE_GUIDANCE_SCALE = 9.0
DEFAULT_NOISE_LEVEL = 20
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

# Batches in flight per denoiser replica: one running, one queued behind it, so
# a replica never idles while the scheduler plans.
BATCHES_IN_FLIGHT_PER_DENOISER = 2

# How long stage replicas may take to start (a cold start imports torch and may
# build a builtin model) before the farm reports that they cannot be placed.
REPLICAS_READY_TIMEOUT_S = 300.0

# The graceful-stop window of the gRPC server.
SHUTDOWN_GRACE_S = 5.0
