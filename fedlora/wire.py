"""Names that cross a boundary, defined once: message contents, reply metrics, metrics.jsonl.

The ServerApp, the ClientApp and `fedlora report` all read these constants; none of them
spells a key as a string literal. No imports: anything may use this module.

A message from the server carries, in its RecordDict:
  - `CONFIG` (ConfigRecord): `SERVER_ROUND`, the adapter `RANK` to use, and `INIT_SEED` for
    the factors the server does not send (a fresh flora adapter, the frozen ffa-lora A, a
    fedsa-lora B before its first round);
  - `ARRAYS`: the global adapter at that rank in PEFT's scale, only the factors the method
    shares (maybe none);
  - `RESIDUAL` (flora, fedex-lora): the frozen low-rank update folded into the base.
A reply carries `ARRAYS` (training) and `METRICS`: `NUM_EXAMPLES`, `PARTITION_ID`,
`LORA_RANK` and the training or evaluation figures below.
"""

# ---- RecordDict entries ------------------------------------------------------------------
CONFIG = "config"
NODE = "node"  # ConfigRecord of a query reply: the node's name (a `fedlora client` node)
ARRAYS = "arrays"
RESIDUAL = "residual"
METRICS = "metrics"
# ConfigRecord of a simulated client's evaluation reply: a few of its answers (lists of the
# SAMPLE_FIELDS, one entry per answer); a deployment node never sends its questions
SAMPLES = "samples"
SAMPLE_FIELDS = ("family", "question", "expected", "answer")

# ---- the server's config record ---------------------------------------------------------
SERVER_ROUND = "server-round"
RANK = "rank"
INIT_SEED = "init-seed"

# ---- secure aggregation (server/secagg.py, clients/secagg.py) ------------------------------
# A ConfigRecord `SECAGG` in a message and in its reply; the stage is `SECAGG_STAGE` of it.
SECAGG = "secagg"
SECAGG_STAGE = "stage"  # train, share-keys, collect-masked, unmask
SECAGG_SITES = "sites"  # sampled sites: sets the bits per entry
SECAGG_CLIP = "clip"
SECAGG_MAX_WEIGHT = "max-weight"
SECAGG_EQUAL = "equal-weights"
SECAGG_DROPOUT = "dropout"  # secagg-dropout: sizes each site's share of the DP noise
SECAGG_RANK = "padded-rank"  # a padded method (hetlora): each site's factors at this rank
SECAGG_C_KEY = "c-key"  # public keys (X9.62) of a site, or of its neighbours (lists)
SECAGG_S_KEY = "s-key"
SECAGG_COMMITMENT = "commitment"  # SHA-256 of the site's self-mask seed
SECAGG_SIGNER = "signer"  # the public key (OpenSSH line) that signed a site's keys (b"": none)
SECAGG_SIGNATURE = "signature"  # of fedlora.secagg.signing.statement, by SECAGG_SIGNER
SECAGG_SIGNED = "signed-survivors"  # unmask: the survivors each site signed at consistency
SECAGG_NODES = "nodes"  # the node ids the lists beside it are about
SECAGG_THRESHOLD = "threshold"
SECAGG_SEALED = "sealed"  # encrypted shares, one per entry of SECAGG_NODES
SECAGG_SURVIVORS = "survivors"
SECAGG_DROPPED = "dropped"
SECAGG_SEED_SHARES = "seed-shares"  # one per survivor, in SECAGG_SURVIVORS' order
SECAGG_KEY_SHARES = "key-shares"  # one per dropped neighbour, in SECAGG_DROPPED's order
SECAGG_CLIPPED = "secagg-clipped"  # reply metric: values the quantisation range clipped
REQUIRE_SECURE_AGGREGATION = "require-secure-aggregation"  # node config

# ---- a node's metric record ---------------------------------------------------------------
LORA_RANK = "lora-rank"
NUM_EXAMPLES = "num-examples"
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
NODE_NAME = "node-name"  # node config of a `fedlora client` node (and its query reply)
TRAIN_LOSS = "train-loss"
TRAIN_LOSS_FIRST = "train-loss-first"
TRAIN_LOSS_LAST = "train-loss-last"
TRAIN_STEPS = "train-steps"
# the loss of each local step (at most MAX_STEP_LOSSES, thinned evenly) and the 1-based local
# step of each value: the trackers' and the report's per-step loss
TRAIN_LOSS_STEPS = "train-loss-steps"
TRAIN_LOSS_AT = "train-loss-at"
MAX_STEP_LOSSES = 256
TRAIN_TOKENS = "train-tokens"
TRAIN_SECONDS = "train-seconds"
EVAL_LOSS = "eval-loss"
EVAL_TOKENS = "eval-tokens"
DP_SGD_EPSILON = "dp-sgd-epsilon"  # dp-sgd: the node's epsilon spent so far in the run
# objective=dpo: held-out preference figures of the global adapter against the base model
PREF_PAIRS = "pref-pairs"
PREF_ACCURACY = "pref-accuracy"  # share of pairs whose chosen reward is above the rejected's
PREF_MARGIN = "pref-margin"  # mean chosen reward - rejected reward (beta x log-ratios)
CHOSEN_LOGP = "chosen-logp"  # mean summed log-probability of the chosen responses
REJECTED_LOGP = "rejected-logp"
PREFERENCE = (PREF_ACCURACY, PREF_MARGIN, CHOSEN_LOGP, REJECTED_LOGP)  # pooled by pairs


class M:
    """Keys of one metrics.jsonl line (one round)."""

    ROUND = "round"
    SECONDS = "seconds"
    TRAIN_LOSS = TRAIN_LOSS
    TRAIN_TOKENS = TRAIN_TOKENS  # per client (inside CLIENTS), as the node reported them
    TRAIN_SECONDS = TRAIN_SECONDS
    TRAIN_STEPS = TRAIN_STEPS  # per client: its local steps this round
    TRAIN_LOSS_STEPS = TRAIN_LOSS_STEPS  # per client: [loss] of (some of) its local steps
    TRAIN_LOSS_AT = TRAIN_LOSS_AT  # per client: [local step, 1-based] of each of those
    EVAL_LOSS = EVAL_LOSS
    EVAL_PERPLEXITY = "eval-perplexity"
    EVAL_CLIENTS = "eval-clients"
    EVAL_FAILED = "eval-failed"  # how many nodes failed to evaluate (of EVAL_FAILURES)
    EVAL_FAILURES = "eval-failures"  # [{node-id, node-name, reason}]; node-name "server":
    # the server's own evaluation (server-eval) failed
    CLIENTS = "clients"  # per client: node-id, partition-id, lora-rank, num-examples, ...
    CLIENTS_SAMPLED = "clients-sampled"
    CLIENTS_REPLIED = "clients-replied"
    CLIENTS_FAILED = "clients-failed"
    FAILURES = "failures"  # [{node-id, reason}]
    FAILED_ATTEMPTS = "failed-attempts"
    BYTES_UP = "bytes-up"
    BYTES_DOWN = "bytes-down"
    BYTES_DOWN_PER_CLIENT = "bytes-down-per-client"
    BYTES_DOWN_EVAL = "bytes-down-eval"
    BYTES_TOTAL = "bytes-total"
    ACCURACY = "accuracy"  # also accuracy/<family>; choice-accuracy(/<task>): multiple choice
    CLIENT_ACCURACY = "client-accuracy"
    EXACTNESS = "exactness"
    EXACTNESS_MAX_MODULE = "exactness-max-module"
    EXACTNESS_PER_MODULE = "exactness-per-module"
    EXACTNESS_ESTIMATE = "exactness-estimate"  # "exact", or "sketch-64": estimated (large)
    TRUNCATION_LOSS = "truncation-loss"
    RESIDUAL_RANK = "residual-rank"
    RESIDUAL_DROPPED = "residual-dropped"
    CLIP_NORM = "clip-norm"
    UPDATE_NORMS = "update-norms"
    CLIENTS_CLIPPED = "clients-clipped"
    DP_NOISE_STD = "dp-noise-std"
    DP_EPSILON = "dp-epsilon"
    DP_DELTA = "dp-delta"
    DP_NOISE_MULTIPLIER = "dp-noise-multiplier"
    UPDATE_NORM_MEDIAN = "update-norm-median"  # the round's lower median ||B A - received||_F
    UPDATE_NORM_BOUND = "update-norm-bound"  # max-update-ratio x that median (null: no bound)
    FACTOR_NORM_MEDIAN = "factor-norm-median"  # the lower median ||(B, A) - received||_2
    WEIGHT_CAP = "weight-cap"  # max-weight-ratio x the lower median num-examples (null: none)
    DOWN_WEIGHTED = "down-weighted"  # [{node-id, node-name, reason}]: capped or not merged
    ROBUST = "robust"  # the robust merge of the round (none, median, trimmed-mean, krum)
    MERGE_SECONDS = "merge-seconds"  # the server's screens and merge of the round
    SERVER_EVAL_LOSS = "server-eval-loss"
    PREF_PAIRS = PREF_PAIRS
    PREF_ACCURACY = PREF_ACCURACY
    PREF_MARGIN = PREF_MARGIN
    CHOSEN_LOGP = CHOSEN_LOGP
    REJECTED_LOGP = REJECTED_LOGP
    SERVER_ACCURACY = "server-accuracy"
    # a few answers: [{family, question, expected, answer, correct, partition-id}], the first
    # SAMPLES_PER_FAMILY of each family (simulated clients' evaluation; server-eval's)
    SAMPLES = "sample-answers"
    SERVER_SAMPLES = "server-sample-answers"
    # per-client fields inside CLIENTS
    NODE_ID = "node-id"
    NODE_DECLARED_NAME = "node-declared-name"  # what a node called itself, when not its key's
    NODE_NAME = NODE_NAME
    PARTITION_ID = PARTITION_ID
    LORA_RANK = LORA_RANK
    NUM_EXAMPLES = NUM_EXAMPLES
    UPDATE_NORM = "update-norm"  # ||B A - B_received A_received||_F over all modules
    WEIGHT = "weight"  # the weight the merge used (num-examples, maybe capped)
    DP_SGD_EPSILON = DP_SGD_EPSILON  # dp-sgd: the node's epsilon spent so far (its figure)
    KRUM_SCORE = "krum-score"
    MERGED = "merged"  # false: not selected by krum
