"""The gateway's benchmark (``python -m loadtest.bench``, ``just bench``): what the gateway
costs, as ratios against baselines measured in the same run on the same machine.

- ``measure``: runs the workloads in rounds against each target;
- ``scaling``: N one-slot backends behind one gateway, against one upstream of N slots;
- ``shared_state``: a gateway sharing its state through Redis against one keeping it
  in-process (``shared_results``: what Redis's statistics say per request; pure);
- ``services``: the fake Ollama, the gateway and nginx as subprocesses;
- ``loadgen``: the aiohttp load generator, run in its own process;
- ``wrk``: small requests through wrk when it is installed;
- ``results``: ratios, targets and the table (pure).
"""
