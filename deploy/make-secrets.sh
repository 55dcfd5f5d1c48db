#!/usr/bin/env bash
# CURVE keys for a cluster, as Kubernetes Secrets (run once, with kubectl pointed at it):
#   splitexit-broker-keys      the brokers' pair (one, mounted by every broker of the StatefulSet)
#   splitexit-allowed-edges    the broker's allow-list for its frontend: the edges' public keys
#   splitexit-allowed-workers  the broker's allow-list for its backend: the workers' public keys
#   splitexit-worker-keys      the workers' pair and the broker's public key
#   splitexit-edge-keys        an edge's pair and the broker's public key (for edges in the cluster)
# A key has one role: an edge's key is refused on the workers' port, and the other way round.
# To admit another camera: splitexit keys DIR --name cam8, then add cam8.key to
# splitexit-allowed-edges (kubectl edit, or delete and create it again) and restart the broker.
set -euo pipefail
dir="$(mktemp -d)"
splitexit keys "$dir" --name broker
splitexit keys "$dir" --name worker
splitexit keys "$dir" --name edge
kubectl create secret generic splitexit-broker-keys \
    --from-file=broker.key_secret="$dir/broker.key_secret"
kubectl create secret generic splitexit-allowed-edges --from-file=edge.key="$dir/edge.key"
kubectl create secret generic splitexit-allowed-workers --from-file=worker.key="$dir/worker.key"
kubectl create secret generic splitexit-worker-keys \
    --from-file=worker.key_secret="$dir/worker.key_secret" --from-file=broker.key="$dir/broker.key"
kubectl create secret generic splitexit-edge-keys \
    --from-file=edge.key_secret="$dir/edge.key_secret" --from-file=broker.key="$dir/broker.key"
echo "I: secrets created; the key files stay in $dir (keep the edge's for devices outside)"
