"""Parses tbot's /metrics with the Prometheus project's Python client, in the format named.

Usage: metrics_peer.py prometheus|openmetrics < exposition
Prints one line per sample, `name{labels} value`, sorted; exits non-zero if the text does not parse.
"""
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics
from prometheus_client.parser import text_string_to_metric_families as prometheus

parse = {"prometheus": prometheus, "openmetrics": openmetrics}[sys.argv[1]]
lines = []
for family in parse(sys.stdin.read()):
    for sample in family.samples:
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
        name = sample.name + (f"{{{labels}}}" if labels else "")
        lines.append(f"{family.type} {name} {sample.value:g}")
print("\n".join(sorted(lines)))
