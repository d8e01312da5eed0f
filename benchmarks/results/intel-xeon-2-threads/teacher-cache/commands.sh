#!/usr/bin/env bash
# The quiet-machine measurements of this session, in one go.
cd /work/main
. /tmp/venv/bin/activate
log() { echo "$(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg) $*" >> /tmp/qb/times.log; }
log start
eofd-kernels bench --step --reps 5 --out benchmarks/results/amd-epyc-2-threads > /tmp/qb/step.log 2>&1
log step-done rc=$?
rm -rf /tmp/gridcache /tmp/gridcache8
/usr/bin/time -f "%e s wall" eofd-kernels cache --out /tmp/gridcache > /tmp/qb/cache.log 2>&1
log cache-done
/usr/bin/time -f "%e s wall" eofd-kernels distill --power 0.5 1 > /tmp/qb/live.log 2>&1
log live-done
/usr/bin/time -f "%e s wall" eofd-kernels distill --power 0.5 1 --teacher-cache /tmp/gridcache > /tmp/qb/cached.log 2>&1
log cached-done
python benchmarks/cache_read.py /tmp/gridcache > /tmp/qb/read.log 2>&1
/usr/bin/time -f "%e s wall" eofd-kernels cache --out /tmp/gridcache8 --dtype int8 > /tmp/qb/cache8.log 2>&1
/usr/bin/time -f "%e s wall" eofd-kernels distill --teacher-cache /tmp/gridcache8 > /tmp/qb/cached8.log 2>&1
python benchmarks/cache_read.py /tmp/gridcache8 > /tmp/qb/read8.log 2>&1
log all-done
