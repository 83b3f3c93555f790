#!/usr/bin/env bash
# chat.py in a real terminal (tmux), typed into with send-keys and read with capture-pane, against
# a trained run: streaming, /reset, /system and Ctrl-D, as a person would see them. Prints the
# screen, with two snapshots taken while a reply was still arriving.
#
#   bash tests/tmux_chat.sh [RUN]          # default runs/latest; needs tmux
#
# Decoding is slowed to 20 tokens/s (tests/slow_chat.py) so that the snapshots catch a reply half
# written. tests/test_chat.py checks the same behaviour in a pseudo-terminal on every test run.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/latest}
S=nanosft-chat-$$
tmux new-session -d -s "$S" -x 110 -y 50 ".venv/bin/python tests/slow_chat.py --ckpt $RUN; sleep 30"
trap 'tmux kill-session -t "$S" 2>/dev/null || true' EXIT

screen() { tmux capture-pane -p -t "$S"; }
at_prompt() { [ "$(screen | sed '/^$/d' | tail -1)" = ">" ]; }  # capture-pane drops the space after ">"
wait_prompt() { for _ in $(seq 300); do at_prompt && return; sleep 0.1; done; echo "no prompt:"; screen; exit 1; }
say() { tmux send-keys -t "$S" -l "$1"; tmux send-keys -t "$S" Enter; sleep 0.2; wait_prompt; }

wait_prompt
tmux send-keys -t "$S" -l "My name is Ada."
tmux send-keys -t "$S" Enter
sleep 0.15; echo "--- while the reply arrives (0.15 s after Enter):"; screen | sed '/^$/d' | tail -1
sleep 0.15; echo "--- a moment later (0.3 s):"; screen | sed '/^$/d' | tail -1
wait_prompt
say "What is my name?"
say "/reset"
say "What is my name?"
say "/reset"
say "Repeat after me: blue river stone"
say "/reset"
say "What is your name?"
say "/system Your name is Kira."
say "What is your name?"
say "/system Your name is Zoltan."
say "What is your name?"
tmux send-keys -t "$S" C-d
sleep 1
echo "--- the whole screen:"
screen | sed '/^$/d'
