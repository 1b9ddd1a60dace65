using System.Globalization;

namespace QcowTier.Tests.Interop.Support;

/// <summary>One guest-level operation that both QcowTier and qemu-io can perform.</summary>
public abstract record Op;

/// <summary>Writes <see cref="Data"/> at <see cref="Offset"/>.</summary>
public sealed record WriteOp(long Offset, byte[] Data) : Op
{
    public override string ToString() => $"write {Offset} +{Data.Length}";
}

/// <summary>Makes a range read as zeroes (qemu-io write -z, with -u when <see cref="Unmap"/>).</summary>
public sealed record ZeroOp(long Offset, long Length, bool Unmap) : Op
{
    public override string ToString() => $"zero{(Unmap ? "-unmap" : "")} {Offset} +{Length}";
}

/// <summary>Discards the whole clusters of a range (qemu-io discard).</summary>
public sealed record DiscardOp(long Offset, long Length) : Op
{
    public override string ToString() => $"discard {Offset} +{Length}";
}

/// <summary>Grows the virtual disk (qemu-io truncate).</summary>
public sealed record ResizeOp(long NewSize) : Op
{
    public override string ToString() => $"resize {NewSize}";
}

/// <summary>Flush (qemu-io flush).</summary>
public sealed record FlushOp : Op
{
    public override string ToString() => "flush";
}

/// <summary>Close and reopen the image (a new qemu-io process on the QEMU side).</summary>
public sealed record ReopenOp : Op
{
    public override string ToString() => "reopen";
}

/// <summary>How QcowTier is driven.</summary>
public enum Api
{
    Sync,
    Async,
    Stream,
}

/// <summary>A qcow2 format configuration, expressible both as qemu-img create -o and as <see cref="QcowCreateOptions"/>.</summary>
public sealed record ImageFormat(int ClusterSize, int RefcountBits, bool V2, bool Lazy, bool Prealloc = false)
{
    public string QemuOptions
        => string.Create(CultureInfo.InvariantCulture,
            $"cluster_size={ClusterSize},refcount_bits={RefcountBits},compat={(V2 ? "0.10" : "1.1")},lazy_refcounts={(Lazy ? "on" : "off")}{(Prealloc ? ",preallocation=metadata" : "")}");

    public QcowCreateOptions Ours(QcowCacheMode cache = QcowCacheMode.Writeback) => new()
    {
        ClusterSize = ClusterSize,
        RefcountBits = RefcountBits,
        Compat = V2 ? QcowCompat.V2 : QcowCompat.V3,
        LazyRefcounts = Lazy,
        Preallocation = Prealloc ? QcowPreallocation.Metadata : QcowPreallocation.Off,
        CacheMode = cache,
    };

    public override string ToString()
        => $"{(V2 ? "v2" : "v3")}-c{ClusterSize}-r{RefcountBits}{(Lazy ? "-lazy" : "")}{(Prealloc ? "-prealloc" : "")}";

    /// <summary>Every legal combination of the interop matrix: v2 allows only 16-bit refcounts and no lazy refcounts.</summary>
    public static IEnumerable<ImageFormat> Matrix()
    {
        foreach (var cs in new[] { 512, 4096, 65536, 2 << 20 })
        {
            yield return new ImageFormat(cs, 16, V2: true, Lazy: false);
            foreach (var bits in new[] { 1, 16, 64 })
            {
                yield return new ImageFormat(cs, bits, V2: false, Lazy: false);
                yield return new ImageFormat(cs, bits, V2: false, Lazy: true);
            }
        }
    }
}

/// <summary>Deterministic operation sequences, scaled to a cluster size.</summary>
public static class Scenarios
{
    /// <summary>A disk size of a few MiB that still spans several clusters (and, for small clusters, several L2 tables).</summary>
    public static long DiskSize(int clusterSize) => clusterSize >= (2 << 20) ? 20L << 20 : 3L << 20;

    public static byte[] Random(Random rng, int length)
    {
        var b = new byte[length];
        rng.NextBytes(b);
        return b;
    }

    /// <summary>
    /// Writes at scattered and unaligned offsets (including across L2-table boundaries and at the end),
    /// in-place overwrites, write-zeroes with and without unmap, discards, a resize, writes after it.
    /// </summary>
    public static List<Op> Standard(long size, int cs, int seed)
    {
        var rng = new Random(seed);
        var l2Span = (long)cs * (cs / 8); // guest bytes one L2 table maps
        var ops = new List<Op>
        {
            new WriteOp(0, Random(rng, 1)),
            new WriteOp(cs / 2 + 3, Random(rng, cs + 100)),
            new WriteOp(size - 777, Random(rng, 777)),
            new WriteOp(3L * cs, Random(rng, 2 * cs)),
            new WriteOp(size / 2 + 12345, Random(rng, 70000)),
            new WriteOp(Math.Min(l2Span, size - 4096) - 1000, Random(rng, 3000)), // straddles an L2 table boundary when cs is small
            new WriteOp(cs / 2 + 100, Random(rng, 50)), // in place
            new ZeroOp(5L * cs + 17, 3L * cs, Unmap: false),
            new ZeroOp(3L * cs, 2L * cs, Unmap: true),
            new ZeroOp(size / 4, 4L * cs, Unmap: true),
            new FlushOp(),
            new DiscardOp(0, 2L * cs + 5),
            new DiscardOp(size / 2 + 11345, 40000),
            new ZeroOp(size / 2 + 40000, 10000, Unmap: false),
            new ResizeOp(size + size / 2 + 512),
            new WriteOp(size - 100, Random(rng, 300)),
            new WriteOp(size + size / 2 + 512 - 1000, Random(rng, 1000)),
            new WriteOp(3L * cs + 7, Random(rng, 100)), // into a cluster that was zeroed with unmap
            new WriteOp(5L * cs, Random(rng, cs)),       // over a zero-flagged allocated cluster
            new ZeroOp(size + size / 2 + 512 - 3L * cs - 7, 3L * cs + 7, Unmap: true), // up to the (unaligned) end
            new WriteOp(size + 4096, Random(rng, 5000)),
            new DiscardOp(size + 4096 - 1, 5002),
            new WriteOp(size / 3, Random(rng, 33333)),
        };
        return ops;
    }

    /// <summary>A second, shorter sequence applied on top of an image another tool already wrote.</summary>
    public static List<Op> Followup(long size, int cs, int seed)
    {
        var rng = new Random(seed);
        return
        [
            new WriteOp(cs / 2 + 50, Random(rng, 2 * cs)),
            new WriteOp(size / 2 + 20000, Random(rng, 9000)),
            new ZeroOp(size / 2 + 12345, 5000, Unmap: false),
            new DiscardOp(size - 2L * cs, 2L * cs),
            new WriteOp(size / 5 + 1, Random(rng, 20000)),
            new ZeroOp(0, 4L * cs, Unmap: false),
            new WriteOp(1, Random(rng, 10)),
            new ResizeOp(size + 8L * cs),
            new WriteOp(size + 3L * cs - 3, Random(rng, 4 * cs)),
        ];
    }
}
