import sys, struct
pid, bname = sys.argv[1], sys.argv[2].split('/')[-1]
pm = open(f"/proc/{pid}/pagemap", "rb"); kf = open("/proc/kpageflags", "rb")
for line in open(f"/proc/{pid}/maps"):
    f = line.split()
    if len(f) >= 6 and f[5].endswith(bname):
        lo, hi = (int(x, 16) for x in f[0].split('-'))
        pm.seek(lo // 4096 * 8); data = pm.read((hi - lo) // 4096 * 8)
        for i in range((hi - lo) // 4096):
            e = struct.unpack_from("<Q", data, i * 8)[0]
            if e >> 63:
                pfn = e & ((1 << 55) - 1)
                kf.seek(pfn * 8); fl = struct.unpack("<Q", kf.read(8))[0]
                print(hex(lo + i * 4096), pfn, (fl >> 15) & 1, (fl >> 16) & 1)
