# Decode attention time against context length, one line per cache format,
# from `clkvq-bench attention --json` (default: results/attention-pocl-cpu.json).
# Reads the JSON through jq, so the plot never drifts from the measurement.
#
#   gnuplot -e "in='results/attention-pocl-cpu.json'; out='results/attention-pocl-cpu.png'; \
#               shape='llama3-8b'; batch=1" results/plot_attention.gp
#
# The dashed line is the time a plain copy kernel (clkvq_copy_bandwidth, the
# run's roof_gbps) would need to move the fp16 cache's bytes: what an fp16
# decode costs if it ran at copy speed. Its GB/s counts read + write, so a
# read-only stream at the same byte rate sits on this line, not under it.

if (!exists("in"))    in    = 'results/attention-pocl-cpu.json'
if (!exists("out"))   out   = 'results/attention-pocl-cpu.png'
if (!exists("shape")) shape = 'llama3-8b'
if (!exists("batch")) batch = 1

# The shape's cache geometry: kv heads and head_dim set the fp16 cache's bytes.
kv_heads = shape eq 'qwen2.5-7b' ? 4 : (shape eq 'phi3-mini' ? 32 : 8)
head_dim = shape eq 'phi3-mini' ? 96 : 128
label    = shape eq 'qwen2.5-7b' ? 'Qwen2.5-7B' : (shape eq 'phi3-mini' ? 'Phi-3-mini' : 'Llama-3-8B')

roof = real(system(sprintf("jq -r '.roof_gbps' '%s'", in)))
device = system(sprintf("jq -r '.device' '%s'", in))
# fp16 K+V bytes of batch sequences of t tokens, over the roof, in ms
roof_ms(t) = 2.0 * kv_heads * t * head_dim * 2 * batch / (roof * 1e9) * 1e3

rows(f) = sprintf("< jq -r '.results[] | select(.shape == \"%s\" and .batch == %d and .format == \"%s\") | \"\\(.tokens) \\(.ms)\"' '%s'", shape, batch, f, in)

formats = "fp16 k8v8 k4v4 k4v2 k2v2 k2v1.5 gemv-fp32"
# one clearly different colour and marker per format, in the order above
colors  = "#000000 #1f77b4 #d62728 #ff7f0e #2ca02c #9467bd #8c564b"
points  = "7 5 9 11 13 15 4"

set terminal pngcairo size 1000,700 enhanced font ",12"
set output out
set title sprintf("%s decode attention, batch %d, one layer\n{/*0.8 %s, copy roof %.1f GB/s}", label, batch, device, roof)
set logscale xy 2
set xlabel "context length (tokens)"
set ylabel "decode time per layer (ms, median device time)"
set format x "%.0f"
set format y "%g"
set xtics (1024, 2048, 4096, 8192, 16384, 32768)
set grid xtics ytics mytics lc rgb "#dddddd"
set key top left box opaque
set xrange [800:42000]

plot for [i=1:words(formats)] rows(word(formats, i)) using 1:2 with linespoints lw 2 \
         lc rgb word(colors, i) pt int(word(points, i)) ps 1.3 title word(formats, i), \
     roof_ms(x) with lines dt 2 lw 2 lc rgb "#777777" title "fp16 copy roof"
