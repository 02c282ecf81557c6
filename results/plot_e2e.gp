# all-MiniLM-L6-v2 end to end (python -m clkvq.e2e --json): how far each KV-cache
# scheme moves the sentence embeddings, against the bits it stores, for the
# sentences as written (join 1) and joined three by three (join 3). Reads the JSON
# through jq, so the plot never drifts from the measurement.
#
#   gnuplot -e "a='results/e2e-minilm-join1.json'; b='results/e2e-minilm-join3.json'; \
#               out='results/e2e-minilm.png'" results/plot_e2e.gp
#
# left: 1 - mean cosine to the fp32 embeddings; right: 1 - Spearman rho of the
# similarities of every pairing of the texts (both log scale: lower is better).
# x: stored bits per element of these texts (packed rows at codes + scale/zero,
# fp16 rows at 16). Rows that equal fp32 exactly (fp16, or windows covering
# the whole text) have nothing to show on a log scale and are left out.

if (!exists("a"))   a   = 'results/e2e-minilm-join1.json'
if (!exists("b"))   b   = 'results/e2e-minilm-join3.json'
if (!exists("out")) out = 'results/e2e-minilm.png'

# "bits 1-cos 1-rho_all label" per row, rows that are exact left out
rows(f) = sprintf("< jq -r '.rows[] | select(.cos_mean < 0.9999999) | \"\\(.bits) \\(1 - .cos_mean) \\(1 - .rho_all) \\(.scheme | sub(\":g32\"; \"\"))\"' '%s'", f)
span(f) = system(sprintf("jq -r '\"\\(.tokens_min)-\\(.tokens_max) tokens\"' '%s'", f))

set terminal pngcairo size 1300,620 enhanced font ",11"
set output out
set multiplot layout 1,2 title "all-MiniLM-L6-v2 with its K/V in a clkvq cache: 40 sentence pairs, vs the fp32 forward pass"
set logscale y
set format y "10^{%L}"
set xlabel "stored bits per element (K and V)"
set grid xtics ytics lc rgb "#dddddd"
set xrange [2:17]
set key top right box opaque font ",10"

set title "embeddings: 1 - mean cosine to fp32"
set ylabel "1 - mean cosine (log)"
set yrange [1e-6:0.3]
plot rows(a) using 1:2 with points pt 7 ps 1.6 lc rgb "#1f77b4" title sprintf("sentences as written (%s)", span(a)), \
     rows(a) using 1:2:4 with labels left offset 0.8,0.3 font ",8" tc rgb "#1f77b4" notitle, \
     rows(b) using 1:2 with points pt 5 ps 1.4 lc rgb "#d62728" title sprintf("joined 3 by 3 (%s)", span(b)), \
     rows(b) using 1:2:4 with labels left offset 0.8,-0.5 font ",8" tc rgb "#d62728" notitle

set title "ranking of all pairings: 1 - Spearman rho"
set ylabel "1 - rho (log)"
set yrange [1e-5:0.3]
plot rows(a) using 1:3 with points pt 7 ps 1.6 lc rgb "#1f77b4" title "sentences as written", \
     rows(a) using 1:3:4 with labels left offset 0.8,0.3 font ",8" tc rgb "#1f77b4" notitle, \
     rows(b) using 1:3 with points pt 5 ps 1.4 lc rgb "#d62728" title "joined 3 by 3", \
     rows(b) using 1:3:4 with labels left offset 0.8,-0.5 font ",8" tc rgb "#d62728" notitle
unset multiplot
