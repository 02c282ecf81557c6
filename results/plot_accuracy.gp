# Attention-output error against storage cost, one line per scheme family,
# from `clkvq-eval --json` (default: results/accuracy.json). Reads the JSON
# through jq, so the plot never drifts from the measurement.
#
#   gnuplot -e "in='results/accuracy.json'; out='results/accuracy.png'" results/plot_accuracy.gp
#
# x: bits per element as clkvq_eval_layer counts it (packed codes + scale/zero
#    + the tokens kept in fp16, K and V averaged), y: relative L2 error of the
#    decode attention output against fp64 attention over the original K/V
#    (log scale). Families are picked by the scheme string: token g32, token
#    g128, kivi, skvq g128 with :calib (lines through their bit widths); the
#    other skvq rows (fixed clip, g32, :perm, fp8) are points of their own, and
#    every row that names no scheme (a --config precision config, e.g. from
#    the layer precision search) is an orange point. fp16 (16 bits, off the
#    x range) is the dashed line: the floor that fp16 rounding sets.

if (!exists("in"))  in  = 'results/accuracy.json'
if (!exists("out")) out = 'results/accuracy.png'

# rows of one family, sorted by bits, "bits rel_err"
rows(re) = sprintf("< jq -r '[.results[] | select(.scheme | test(\"%s\"))] | sort_by(.bits_per_element)[] | \"\\(.bits_per_element) \\(.rel_err)\"' '%s'", re, in)
# the scheme strings of a family, space-separated (each its own point series)
names(re) = system(sprintf("jq -r '[.results[] | select(.scheme | test(\"%s\")) | .scheme] | join(\" \")' '%s'", re, in))
one(name) = sprintf("< jq -r '.results[] | select(.scheme == \"%s\") | \"\\(.bits_per_element) \\(.rel_err)\"' '%s'", name, in)

calib  = system(sprintf("jq -r '.calib' '%s'", in))
model  = system(sprintf("jq -r '.model' '%s'", in))
layers = system(sprintf("jq -r '.n_layers' '%s'", in))
tokens = system(sprintf("jq -r '.n_tokens' '%s'", in))
nq     = system(sprintf("jq -r '.queries' '%s'", in))
fp16   = real(system(sprintf("jq -r '[.results[] | select(.scheme == \"fp16\") | .rel_err][0] // 0' '%s'", in)))
variants = names("^skvq:(?!.*:g128:w128:s5:calib$)")
configs  = names("^(?!fp16|token|kivi|skvq)")
vcolors  = "#9467bd #8c564b #e377c2 #7f7f7f #bcbd22 #17becf #000080 #808000"
cpoints  = "4 6 8 10 12 14 3 1"

set terminal pngcairo size 1100,750 enhanced font ",12"
set output out
set title sprintf("Decode attention output error vs KV storage\n{/*0.8 %s: %s layers x %s tokens, last %s positions per layer; :calib/:perm rows calibrated in-sample}", model, layers, tokens, nq)
set logscale y
set xlabel "bits per element (codes + scale/zero + fp16 window/sinks/residual, K and V averaged)"
set ylabel "relative L2 error of attention output (log)"
set format y "%g"
set grid xtics ytics mytics lc rgb "#dddddd"
set key outside right top box opaque font ",10"
set xrange [2:10]
set xtics 1
set yrange [0.001:2]

plot rows("^token:.*:g32$")  using 1:2 with linespoints lw 2 lc rgb "#1f77b4" pt 5 ps 1.3 title "token g32", \
     rows("^token:.*:g128$") using 1:2 with linespoints lw 2 lc rgb "#17becf" pt 4 ps 1.3 title "token g128", \
     rows("^kivi:")          using 1:2 with linespoints lw 2 lc rgb "#d62728" pt 9 ps 1.5 title "kivi g32 r128", \
     rows("^skvq:.*:g128:w128:s5:calib$") using 1:2 with linespoints lw 2 lc rgb "#2ca02c" pt 7 ps 1.3 title "skvq g128 w128 s5 :calib", \
     for [i=1:words(variants)] one(word(variants, i)) using 1:2 with points \
         lc rgb word(vcolors, (i - 1) % 8 + 1) pt int(word(cpoints, (i - 1) % 8 + 1)) ps 1.8 lw 2 title word(variants, i), \
     for [i=1:words(configs)] one(word(configs, i)) using 1:2 with points \
         lc rgb "#ff7f0e" pt int(word(cpoints, (i - 1) % 8 + 1)) ps 2 lw 2 title sprintf("config %s", word(configs, i)), \
     (fp16 > 0 ? fp16 : 1/0) with lines dt 2 lw 2 lc rgb "#000000" title "fp16 (16 bits)"
