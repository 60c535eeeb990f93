import time, os, numpy as np, pyarrow as pa, lancedb, tempfile
rng = np.random.default_rng(0); n = 20000
for dim in (1024, 256, 64):
    d = tempfile.mkdtemp(); db = lancedb.connect(d)
    v = rng.normal(size=(n, dim)).astype(np.float32); v /= np.linalg.norm(v, axis=1, keepdims=True)
    t = db.create_table("t", pa.table({"chip_id": [str(i) for i in range(n)], "vector": pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), dim)}))
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)
    q = v[:20]; t.search(q[0]).metric("cosine").limit(10).to_arrow()
    s = time.perf_counter()
    for x in q: t.search(x).metric("cosine").limit(10).to_arrow()
    print(dim, f"{size/1e6:.1f} MB", f"{(time.perf_counter()-s)/20*1000:.1f} ms/query")
