using QcowTier.Tests.Infrastructure;
using QcowTier.Tests.Interop.Support;

namespace QcowTier.Tests.Crash;

/// <summary>A byte range some operation after the last completed flush may have changed, and to what.</summary>
internal sealed record Effect(long Offset, long Length, byte[]? Data)
{
    public byte ValueAt(long pos) => Data is null ? (byte)0 : Data[pos - Offset];
}

/// <summary>qemu-img amend in the middle of a sequence (the content never changes).</summary>
internal sealed record AmendOp(QcowAmendOptions Options) : Op
{
    public override string ToString() => $"amend compat={Options.Compat} lazy={Options.LazyRefcounts} bits={Options.RefcountBits}";
}

/// <summary>qemu-img resize --preallocation (growth; the new part reads as zeroes).</summary>
internal sealed record PreallocatedResizeOp(long NewSize, QcowPreallocation Mode) : Op
{
    public override string ToString() => $"resize {NewSize} --preallocation={Mode}";
}

/// <summary>How the unflushed writes are treated at the power cut.</summary>
internal enum CrashMode
{
    /// <summary>All lost.</summary>
    DropAll,

    /// <summary>A random subset survives, persisted in random order.</summary>
    RandomSubsetReordered,

    /// <summary>As above, with every write torn into independently surviving 512-byte sectors.</summary>
    TornSectors,
}

/// <summary>Runs an operation sequence over a <see cref="FaultInjectingStorage"/>, cuts the power, and judges the result with qemu-img.</summary>
internal static class CrashHarness
{
    public sealed class Outcome
    {
        public required byte[] Crashed { get; init; }
        public required ContentModel Flushed { get; init; }
        public required List<Effect> After { get; init; }
        public required List<long> PossibleSizes { get; init; }
        public required bool Cut { get; init; }
        public required long Writes { get; init; }
    }

    /// <summary>Counts the storage writes the sequence makes after creation (to choose cut points).</summary>
    public static long CountWrites(ImageFormat fmt, long size, IReadOnlyList<Op> setup, IReadOnlyList<Op> ops)
        => Run(fmt, size, setup, ops, cutAt: long.MaxValue, CrashMode.DropAll, seed: 0).Writes;

    /// <summary>Creates the image, applies <paramref name="setup"/> and flushes (all durable), then arms the cut and runs <paramref name="ops"/>.</summary>
    public static Outcome Run(ImageFormat fmt, long size, IReadOnlyList<Op> setup, IReadOnlyList<Op> ops, long cutAt, CrashMode mode, int seed)
    {
        var storage = new FaultInjectingStorage(name: "crash.qcow2");
        var image = QcowImage.CreateOn(storage, size, fmt.Ours());
        var live = new ContentModel(size, fmt.ClusterSize);
        foreach (var op in setup)
        {
            Apply(ref image, storage, op);
            live.Apply(op);
        }
        // Reopen with the smallest caches, so dirty L2 tables and refcount blocks are also written back
        // by eviction in the middle of operations, not only at flushes.
        image.Dispose();
        image = QcowImage.OpenOn(storage, SmallCaches(fmt.ClusterSize));
        var flushed = live.Clone();
        var after = new List<Effect>();
        var sizes = new List<long> { live.Size };
        var startWrites = storage.WriteCount;
        storage.CutAtWrite(cutAt);
        var cut = false;
        try
        {
            foreach (var op in ops)
            {
                // Record first: an operation interrupted by the cut may have landed partly.
                RecordEffects(op, live, fmt.ClusterSize, after, sizes);
                Apply(ref image, storage, op);
                live.Apply(op is PreallocatedResizeOp p ? new ResizeOp(p.NewSize) : op);
                if (op is FlushOp)
                {
                    flushed = live.Clone();
                    after.Clear();
                    sizes.Clear();
                    sizes.Add(live.Size);
                }
            }
            image.Dispose(); // flushes: everything becomes durable unless the cut comes first
            flushed = live.Clone();
            after.Clear();
            sizes.Clear();
            sizes.Add(live.Size);
        }
        catch (Exception e) when (storage.IsCut)
        {
            _ = e;
            cut = true;
            try
            {
                image.Dispose();
            }
            catch (Exception e2) when (storage.IsCut)
            {
                _ = e2; // the device is gone; the image object is abandoned
            }
        }
        var writes = storage.WriteCount - startWrites;
        var bytes = mode switch
        {
            CrashMode.DropAll => storage.DurableImage(),
            CrashMode.RandomSubsetReordered => storage.CrashImage(new Random(seed), 0.5, tear: false),
            _ => storage.CrashImage(new Random(seed), 0.5, tear: true),
        };
        return new Outcome { Crashed = bytes, Flushed = flushed, After = after, PossibleSizes = sizes, Cut = cut, Writes = writes };
    }

    private static void Apply(ref QcowImage image, FaultInjectingStorage storage, Op op)
    {
        switch (op)
        {
            case WriteOp w: image.Write(w.Offset, w.Data); break;
            case ZeroOp z: image.WriteZeroes(z.Offset, z.Length, z.Unmap); break;
            case DiscardOp d: image.Discard(d.Offset, d.Length); break;
            case ResizeOp r: image.Resize(r.NewSize); break;
            case AmendOp a: image.Amend(a.Options); break;
            case PreallocatedResizeOp p: image.Resize(p.NewSize, p.Mode); break;
            case FlushOp: image.Flush(); break;
            case ReopenOp:
                var cs = image.ClusterSize;
                image.Dispose();
                image = QcowImage.OpenOn(storage, SmallCaches(cs));
                break;
            default: throw new ArgumentException(op.ToString(), nameof(op));
        }
    }

    private static QcowOpenOptions SmallCaches(int clusterSize) => new() { L2CacheSize = 2L * clusterSize, RefcountCacheSize = 2L * clusterSize };

    private static void RecordEffects(Op op, ContentModel live, int cs, List<Effect> after, List<long> sizes)
    {
        switch (op)
        {
            case WriteOp w:
                after.Add(new Effect(w.Offset, w.Data.Length, w.Data));
                break;
            case ZeroOp z:
                after.Add(new Effect(z.Offset, z.Length, null));
                break;
            case DiscardOp d:
                var start = (d.Offset + cs - 1) / cs * cs;
                var end = d.Offset + d.Length == live.Size ? live.Size : (d.Offset + d.Length) / cs * cs;
                if (end > start)
                {
                    after.Add(new Effect(start, end - start, null));
                }
                break;
            case PreallocatedResizeOp p:
                sizes.Add(p.NewSize);
                break;
            case ResizeOp r:
                sizes.Add(r.NewSize);
                if (r.NewSize < live.Size)
                {
                    // A shrink deletes the tail: a cut may leave the old size with the tail already zeroed.
                    after.Add(new Effect(r.NewSize, live.Size - r.NewSize, null));
                }
                break;
        }
    }

    /// <summary>
    /// Every byte must hold what it held at the last completed flush, or a value some later operation
    /// wrote there (those may or may not have reached the disk, in any combination).
    /// </summary>
    public static void AssertPossibleContent(Outcome o, ReadOnlySpan<byte> actual, string what)
    {
        o.PossibleSizes.Should().Contain(actual.Length, $"{what}: the virtual size is one the image had since the last flush");
        var flushed = o.Flushed.Bytes;
        for (var i = 0; i < actual.Length; i++)
        {
            var expected = i < flushed.Length ? flushed[i] : (byte)0;
            if (actual[i] == expected)
            {
                continue;
            }
            var ok = false;
            foreach (var e in o.After)
            {
                if (i >= e.Offset && i < e.Offset + e.Length && e.ValueAt(i) == actual[i])
                {
                    ok = true;
                    break;
                }
            }
            if (!ok)
            {
                throw new Xunit.Sdk.XunitException(
                    $"{what}: byte {i} (0x{i:x}) is 0x{actual[i]:x2}; flushed content says 0x{expected:x2} and no later operation wrote 0x{actual[i]:x2} there");
            }
        }
    }

    /// <summary>
    /// The full judgement of a crash image: qemu-img check finds no corruption (leaks allowed); the content
    /// is possible (through us, read-only, and through qemu-img convert); qemu-img check -r all repairs it to
    /// clean with the same content.
    /// </summary>
    public static void Judge(Outcome o, TempDir dir, string label, bool repair = true)
    {
        var path = dir.File($"{label}.qcow2");
        File.WriteAllBytes(path, o.Crashed);
        var report = QemuTools.Check(path);
        if (!report.NoCorruption)
        {
            var human = QemuTools.Img("check", "-f", "qcow2", path);
            throw new Xunit.Sdk.XunitException($"{label}: qemu-img check reports corruption after the power cut:\n{human.StdOut}{human.StdErr}");
        }

        byte[] ours;
        using (var img = QcowImage.OpenOn(new FaultInjectingStorage(o.Crashed, path), new QcowOpenOptions { ReadOnly = true }))
        {
            ours = new byte[img.Size];
            img.Read(0, ours);
        }
        AssertPossibleContent(o, ours, $"{label} read by us");
        var raw = QemuTools.ReadRaw(path, dir);
        QemuTools.AssertBytesEqual(ours, raw, $"{label}: our read vs qemu-img convert");

        if (repair)
        {
            var r = QemuTools.Img("check", "-r", "all", "-f", "qcow2", path);
            r.ExitCode.Should().Be(0, $"{label}: qemu-img check -r all repairs everything:\n{r.StdOut}{r.StdErr}");
            QemuTools.AssertClean(path);
            QemuTools.AssertBytesEqual(raw, QemuTools.ReadRaw(path, dir), $"{label}: content after repair");
        }
        File.Delete(path);
    }

    /// <summary>Cut points: all of 1..total when few, otherwise an even spread that always includes the first and last few.</summary>
    public static IEnumerable<long> CutPoints(long total, int budget)
    {
        if (total <= budget)
        {
            for (var n = 1L; n <= total + 1; n++)
            {
                yield return n;
            }
            yield break;
        }
        var set = new SortedSet<long>();
        var ends = Math.Min(3, Math.Max(1, budget / 4));
        for (var n = 1L; n <= ends; n++)
        {
            set.Add(n);
            set.Add(total + 2 - n);
        }
        var step = (double)total / Math.Max(1, budget - 2 * ends);
        for (var x = 1.0 + step / 2; x < total; x += step)
        {
            set.Add((long)x);
        }
        foreach (var n in set)
        {
            yield return n;
        }
    }
}
