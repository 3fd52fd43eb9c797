#!/bin/bash
# Copies the metanetwork weights of a running campaign every 500 outer steps (for validation).
run=$1; out=$2; mkdir -p "$out"
while true; do
  latest=$(cat "$run/latest" 2>/dev/null)
  step=${latest#ckpt-}
  if [[ -n "$step" && $((step % ${3:-500})) -eq 0 && ! -f "$out/step-$step.safetensors" ]]; then
    cp "$run/$latest/lopt.safetensors" "$out/step-$step.safetensors.tmp" && mv "$out/step-$step.safetensors.tmp" "$out/step-$step.safetensors"
  fi
  sleep 3
done
