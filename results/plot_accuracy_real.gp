# Attention-output error against bits_long on the real all-MiniLM-L6-v2 dumps
# (results/accuracy-real.md), from two `clkvq-eval --json` files: one
# evaluated on each text, fitted on the other (out of sample). Reads the
# JSON through jq, so the plot never drifts from the measurement.
#
#   gnuplot -e "a='results/accuracy-real-gpl3-q16.json'; b='results/accuracy-real-apache2-q16.json'; out='results/accuracy-real.png'" results/plot_accuracy_real.gp
#
# x: bits_long (packed codes + scale/zero per element as the context grows
#    without bound, K and V averaged: fp16 sinks, windows and residuals
#    excluded), y: relative L2 error of the decode attention output against
#    fp64 attention over the original K/V (log scale). One point per row,
#    coloured by family: token, kivi, skvq with per-token keys, skvq with
#    per-channel keys (kc), and precision configs from the layer search (the
#    rows that name no scheme). The dashed line is half of KIVI k2v2's error
#    on that dump: the target.

if (!exists("a"))   a   = 'results/accuracy-real-gpl3-q16.json'
if (!exists("b"))   b   = 'results/accuracy-real-apache2-q16.json'
if (!exists("out")) out = 'results/accuracy-real.png'

names(f, re) = system(sprintf("jq -r '[.results[] | select(.scheme | test(\"%s\")) | .scheme] | join(\" \")' '%s'", re, f))
one(f, name) = sprintf("< jq -r '.results[] | select(.scheme == \"%s\") | \"\\(.bits_long) \\(.rel_err)\"' '%s'", name, f)
half(f)  = real(system(sprintf("jq -r '[.results[] | select(.scheme == \"kivi:k2v2:g32:r128\") | .rel_err][0] // 0' '%s'", f))) / 2
text(f, key) = system(sprintf("jq -r '.%s' '%s'", key, f))
base(p) = system(sprintf("basename '%s' .safetensors", p))

pts = "5 7 9 11 13 4 6 8 10 12 14 3 1 2"
pt(i) = int(word(pts, (i - 1) % 14 + 1))

set terminal pngcairo size 1500,1300 enhanced font ",11"
set output out
set multiplot layout 2,1 title sprintf("Decode attention output error vs bits\\_long, all-MiniLM-L6-v2 (6 layers x 512 tokens, last %s positions per layer)\n{/*0.85 fitted rows (calib, perm, center) and searched configs are fitted on the other text: out of sample}", text(a, "queries"))

do for [f in a." ".b] {
    tok  = names(f, "^token:")
    kiv  = names(f, "^kivi:")
    sk   = names(f, "^skvq:(?!.*:kc(:|$))")
    kc   = names(f, "^skvq:.*:kc(:|$)")
    cfg  = names(f, "^(?!fp16|token|kivi|skvq)")
    h    = half(f)
    set title sprintf("evaluated on %s, fitted on %s", base(text(f, "calib")), base(text(f, "fit")))
    set logscale y
    set xlabel "bits\\_long (codes + scale/zero per element, K and V averaged; fp16 sinks/window/residual excluded)"
    set ylabel "relative L2 error of attention output (log)"
    set format y "%g"
    set grid xtics ytics mytics lc rgb "#dddddd"
    set key outside right top box opaque font ",8" spacing 0.9
    set xrange [1.9:5.6]
    set xtics 0.5
    set yrange [0.02:0.7]
    plot for [i=1:words(tok)] one(f, word(tok, i)) using 1:2 with points lc rgb "#1f77b4" pt pt(i) ps 1.6 lw 2 title word(tok, i), \
         for [i=1:words(kiv)] one(f, word(kiv, i)) using 1:2 with points lc rgb "#d62728" pt pt(i) ps 1.6 lw 2 title word(kiv, i), \
         for [i=1:words(sk)]  one(f, word(sk, i))  using 1:2 with points lc rgb "#2ca02c" pt pt(i) ps 1.6 lw 2 title word(sk, i), \
         for [i=1:words(kc)]  one(f, word(kc, i))  using 1:2 with points lc rgb "#9467bd" pt pt(i) ps 1.8 lw 2 title word(kc, i), \
         for [i=1:words(cfg)] one(f, word(cfg, i)) using 1:2 with points lc rgb "#ff7f0e" pt pt(i) ps 2 lw 2 title sprintf("config %s", word(cfg, i)), \
         (h > 0 ? h : 1/0) with lines dt 2 lw 2 lc rgb "#000000" title "0.5 x kivi:k2v2:g32:r128"
}
unset multiplot
