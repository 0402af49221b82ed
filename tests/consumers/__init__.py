"""CPU transcriptions of the code paths through which each consumer hands a DeepEP config to deep_ep.

Each module imports `deep_ep` lazily (the test puts tests/fake_deep_ep on sys.path) and keeps, line for line, what
the consumer does with num_sms / chunk / buffer values and how it sizes its Buffer, including what it ignores.
Token permutation, logging, streams and autograd plumbing are dropped; forward and backward communication calls are
kept as plain functions. Each module names the consumer commit and the lines it transcribes.
"""
