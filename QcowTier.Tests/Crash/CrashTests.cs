using QcowTier.Tests.Infrastructure;
using QcowTier.Tests.Interop.Support;

namespace QcowTier.Tests.Crash;

/// <summary>
/// Power cuts at every (or an even spread of) storage write of an operation sequence. After each cut the
/// surviving bytes must pass qemu-img check (leaks allowed), repair to clean with -r all, and hold every
/// write a completed Flush covered.
/// </summary>
public sealed class CrashTests
{
    private sealed record Scenario(ImageFormat Format, long Size, List<Op> Setup, List<Op> Ops);

    private static byte[] Data(int seed, int length)
    {
        var b = new byte[length];
        new Random(seed).NextBytes(b);
        return b;
    }

    private static Scenario Get(string name)
    {
        switch (name)
        {
            case "allocating-writes":
                {
                    // 4 KiB clusters: new L2 tables, multi-cluster allocations, in-place overwrites, flushes in between.
                    var f = new ImageFormat(4096, 16, V2: false, Lazy: false);
                    return new Scenario(f, 6L << 20, [],
                    [
                        new WriteOp(100, Data(1, 10000)),
                        new WriteOp(3L << 20, Data(2, 4096)),
                        new FlushOp(),
                        new WriteOp(50, Data(3, 100)),            // in place
                        new WriteOp((2L << 20) - 2000, Data(4, 5000)), // across an L2 table boundary
                        new WriteOp(5L << 20, Data(5, 70000)),
                        new FlushOp(),
                        new WriteOp(8192 + 7, Data(6, 20000)),
                        new WriteOp((6L << 20) - 1, Data(7, 1)),
                    ]);
                }
            case "discard-zero-reuse":
                {
                    // Freed clusters are reused by later writes: the cut must never let an old L2 entry see new data.
                    var f = new ImageFormat(4096, 16, V2: false, Lazy: false);
                    return new Scenario(f, 2L << 20,
                    [
                        new WriteOp(0, Data(10, 256 << 10)),
                        new WriteOp(1L << 20, Data(11, 128 << 10)),
                    ],
                    [
                        new DiscardOp(4096, 64 << 10),
                        new ZeroOp(128 << 10, 64 << 10, Unmap: true),
                        new ZeroOp((1L << 20) + 100, 10000, Unmap: false),
                        new WriteOp(1536 << 10, Data(12, 96 << 10)), // reuses what was freed
                        new FlushOp(),
                        new DiscardOp(1L << 20, 64 << 10),
                        new WriteOp(300 << 10, Data(13, 64 << 10)),
                        new ZeroOp(0, 8192, Unmap: false),
                        new FlushOp(),
                        new WriteOp(4096, Data(14, 8192)),
                    ]);
                }
            case "resize-l1-growth":
                {
                    // 512-byte clusters: one L2 table maps 32 KiB, so growing the disk grows (and moves) the L1 table.
                    var f = new ImageFormat(512, 16, V2: false, Lazy: false);
                    return new Scenario(f, 32 << 10,
                    [
                        new WriteOp(1000, Data(20, 3000)),
                    ],
                    [
                        new ResizeOp(1L << 20),
                        new WriteOp((1L << 20) - 5000, Data(21, 5000)),
                        new FlushOp(),
                        new ResizeOp(3L << 20),
                        new WriteOp(2L << 20, Data(22, 40000)),
                        new WriteOp(10, Data(23, 10)),
                    ]);
                }
            case "refcount-table-growth":
                {
                    // 512-byte clusters with 64-bit refcounts: a refcount block covers 32 KiB and the one-cluster
                    // table only 2 MiB of file, so writing 3 MiB forces new blocks and a table relocation.
                    var f = new ImageFormat(512, 64, V2: false, Lazy: false);
                    return new Scenario(f, 4L << 20, [],
                    [
                        new WriteOp(0, Data(30, 1 << 20)),
                        new FlushOp(),
                        new WriteOp(1L << 20, Data(31, 1 << 20)),
                        new WriteOp(2L << 20, Data(32, 1 << 20)),
                        new FlushOp(),
                        new DiscardOp(0, 512 << 10),
                        new WriteOp(3L << 20, Data(33, 256 << 10)),
                    ]);
                }
            case "v2-zeroes":
                {
                    // Version 2 has no zero flag: zeroing writes zeroes, unmapping deallocates.
                    var f = new ImageFormat(65536, 16, V2: true, Lazy: false);
                    return new Scenario(f, 4L << 20,
                    [
                        new WriteOp(0, Data(40, 512 << 10)),
                    ],
                    [
                        new ZeroOp(1000, 200000, Unmap: false),
                        new FlushOp(),
                        new ZeroOp(256 << 10, 128 << 10, Unmap: true),
                        new WriteOp(3L << 20, Data(41, 100000)),
                        new DiscardOp(0, 65536),
                    ]);
                }
            case "lazy-refcounts":
                {
                    var f = new ImageFormat(65536, 16, V2: false, Lazy: true);
                    return new Scenario(f, 4L << 20, [],
                    [
                        new WriteOp(5, Data(50, 200000)),
                        new FlushOp(),
                        new WriteOp(2L << 20, Data(51, 65536)),
                        new DiscardOp(0, 131072),
                        new WriteOp(3L << 20, Data(52, 1000)),
                    ]);
                }
            case "reopen":
                {
                    var f = new ImageFormat(4096, 1, V2: false, Lazy: false);
                    return new Scenario(f, 1L << 20,
                    [
                        new WriteOp(0, Data(60, 50000)),
                    ],
                    [
                        new WriteOp(60000, Data(61, 50000)),
                        new ReopenOp(),
                        new DiscardOp(0, 20000),
                        new WriteOp(200000, Data(62, 5000)),
                    ]);
                }
            case "shrink":
                {
                    // 512-byte clusters: a shrink frees whole L2 tables (L1 entries zeroed), refcount blocks and the
                    // file's tail; growing again must read zeroes where the old data was.
                    var f = new ImageFormat(512, 16, V2: false, Lazy: false);
                    return new Scenario(f, 1L << 20,
                    [
                        new WriteOp(0, Data(70, 1 << 20)),
                    ],
                    [
                        new ResizeOp((300 << 10) + 512),
                        new WriteOp(300 << 10, Data(71, 512)),
                        new FlushOp(),
                        new ResizeOp(1L << 20),
                        new WriteOp(900 << 10, Data(72, 4096)),
                        new ResizeOp(100 << 10),
                        new WriteOp(5000, Data(73, 3000)),
                    ]);
                }
            case "amend-refcount-width":
                {
                    // The refcount structures are rewritten and switched to with one header write; a cut leaks at worst.
                    var f = new ImageFormat(4096, 16, V2: false, Lazy: false);
                    return new Scenario(f, 2L << 20,
                    [
                        new WriteOp(0, Data(80, 300 << 10)),
                        new WriteOp(1L << 20, Data(81, 100 << 10)),
                    ],
                    [
                        new AmendOp(new QcowAmendOptions { RefcountBits = 1 }),
                        new WriteOp(600 << 10, Data(82, 50000)),
                        new FlushOp(),
                        new AmendOp(new QcowAmendOptions { RefcountBits = 64 }),
                        new DiscardOp(0, 64 << 10),
                        new WriteOp(1500 << 10, Data(83, 9000)),
                    ]);
                }
            case "amend-downgrade":
                {
                    // Zero clusters expanded (zeroes written first), then the header rewritten as version 2; and back.
                    var f = new ImageFormat(4096, 16, V2: false, Lazy: true);
                    return new Scenario(f, 2L << 20,
                    [
                        new WriteOp(0, Data(90, 200 << 10)),
                        new ZeroOp(16 << 10, 32 << 10, Unmap: false),
                        new ZeroOp(100 << 10, 16 << 10, Unmap: true),
                        new ZeroOp(1L << 20, 64 << 10, Unmap: false),
                    ],
                    [
                        new WriteOp(300 << 10, Data(91, 5000)),
                        new AmendOp(new QcowAmendOptions { Compat = QcowCompat.V2 }),
                        new WriteOp(400 << 10, Data(92, 5000)),
                        new FlushOp(),
                        new AmendOp(new QcowAmendOptions { Compat = QcowCompat.V3, LazyRefcounts = true }),
                        new ZeroOp(0, 8192, Unmap: false),
                    ]);
                }
            case "grow-preallocated":
                {
                    // resize --preallocation: tables and data clusters linked (and zeroes written for full) before the size.
                    var f = new ImageFormat(4096, 16, V2: false, Lazy: false);
                    return new Scenario(f, 512 << 10,
                    [
                        new WriteOp(1000, Data(100, 20000)),
                    ],
                    [
                        new PreallocatedResizeOp(3L << 20, QcowPreallocation.Metadata),
                        new WriteOp((3L << 20) - 5000, Data(101, 5000)),
                        new FlushOp(),
                        new PreallocatedResizeOp(4L << 20, QcowPreallocation.Full),
                        new WriteOp(3L << 20, Data(102, 7000)),
                        new PreallocatedResizeOp((5L << 20) + 512, QcowPreallocation.Falloc),
                    ]);
                }
            default:
                throw new ArgumentException(name, nameof(name));
        }
    }

    public static TheoryData<string> ScenarioNames() => new()
    {
        "allocating-writes",
        "discard-zero-reuse",
        "resize-l1-growth",
        "refcount-table-growth",
        "v2-zeroes",
        "lazy-refcounts",
        "reopen",
        "shrink",
        "amend-refcount-width",
        "amend-downgrade",
        "grow-preallocated",
    };

    /// <summary>Every unflushed write lost, at an even spread of cut points (all of them when few).</summary>
    [Theory]
    [MemberData(nameof(ScenarioNames))]
    public void PowerCutLosingEveryUnflushedWrite(string scenario) => Sweep(scenario, CrashMode.DropAll, budget: 24);

    /// <summary>A random subset of unflushed writes survives, in random order (disks reorder).</summary>
    [Theory]
    [MemberData(nameof(ScenarioNames))]
    public void PowerCutKeepingARandomReorderedSubset(string scenario) => Sweep(scenario, CrashMode.RandomSubsetReordered, budget: 12);

    /// <summary>As above with writes torn into 512-byte sectors (only sector writes are atomic).</summary>
    [Theory]
    [MemberData(nameof(ScenarioNames))]
    public void PowerCutWithTornSectorWrites(string scenario) => Sweep(scenario, CrashMode.TornSectors, budget: 8);

    /// <summary>A dense sweep: every cut point of the short sequences, 100 spread over the long ones.</summary>
    [Theory]
    [Trait("Category", "Heavy")]
    [MemberData(nameof(ScenarioNames))]
    public void PowerCutDenseSweep(string scenario)
    {
        Sweep(scenario, CrashMode.DropAll, budget: 100, repairEvery: 4);
        Sweep(scenario, CrashMode.TornSectors, budget: 40, repairEvery: 4);
    }

    /// <summary>QCOWTIER_STRESS=n multiplies the cut points (and varies the seeds) for a longer hunt; default 1.</summary>
    internal static int Stress => int.TryParse(Environment.GetEnvironmentVariable("QCOWTIER_STRESS"), out var n) && n > 1 ? n : 1;

    private static void Sweep(string name, CrashMode mode, int budget, int repairEvery = 1)
    {
        budget = (int)Math.Min(int.MaxValue, (long)budget * Stress);
        var s = Get(name);
        var total = CrashHarness.CountWrites(s.Format, s.Size, s.Setup, s.Ops);
        total.Should().BeGreaterThan(0);
        using var dir = new TempDir();
        var i = 0;
        foreach (var n in CrashHarness.CutPoints(total, budget))
        {
            var seed = (int)n * 7919 + (int)mode + Stress * 104729;
            var outcome = CrashHarness.Run(s.Format, s.Size, s.Setup, s.Ops, n, mode, seed);
            if (n <= total)
            {
                outcome.Cut.Should().BeTrue($"cut at write {n} of {total}");
            }
            CrashHarness.Judge(outcome, dir, $"{name}-{mode}-cut{n}of{total}", repair: i++ % repairEvery == 0);
        }
    }

    /// <summary>
    /// Lazy refcounts: the image is marked dirty while written; after a cut the dirty bit is still set,
    /// and our writable open repairs the refcounts and clears it, keeping every flushed write.
    /// </summary>
    [Fact]
    public void LazyRefcountsDirtyImageIsRepairedOnWritableOpen()
    {
        var s = Get("lazy-refcounts");
        var total = CrashHarness.CountWrites(s.Format, s.Size, s.Setup, s.Ops);
        using var dir = new TempDir();
        foreach (var n in CrashHarness.CutPoints(total, 6))
        {
            var o = CrashHarness.Run(s.Format, s.Size, s.Setup, s.Ops, n, CrashMode.RandomSubsetReordered, (int)n);
            if (!o.Cut)
            {
                continue;
            }
            var path = dir.File($"lazy-{n}.qcow2");
            File.WriteAllBytes(path, o.Crashed);
            QemuTools.AssertNoCorruption(path);
            if (!HeaderDirty(path))
            {
                continue; // cut before the first write marked it dirty
            }
            using (var img = QcowImage.Open(path))
            {
                img.GetInfo().Dirty.Should().BeFalse("the open repaired the image and cleared the dirty bit");
                var buf = new byte[img.Size];
                img.Read(0, buf);
                CrashHarness.AssertPossibleContent(o, buf, $"lazy cut {n} after repair");
            }
            HeaderDirty(path).Should().BeFalse();
            QemuTools.AssertClean(path);
        }
    }

    private static bool HeaderDirty(string path)
    {
        var h = new byte[80];
        using var f = File.OpenRead(path);
        f.ReadExactly(h);
        return (h[79] & 1) != 0;
    }

    /// <summary>After a cut, we keep writing the leaky image; it stays free of corruption and QEMU agrees on the content.</summary>
    [Fact]
    public void CrashedImageCanBeWrittenAgain()
    {
        var s = Get("discard-zero-reuse");
        var total = CrashHarness.CountWrites(s.Format, s.Size, s.Setup, s.Ops);
        using var dir = new TempDir();
        foreach (var n in CrashHarness.CutPoints(total, 5))
        {
            var o = CrashHarness.Run(s.Format, s.Size, s.Setup, s.Ops, n, CrashMode.RandomSubsetReordered, (int)n + 1);
            var path = dir.File($"again-{n}.qcow2");
            File.WriteAllBytes(path, o.Crashed);
            var qemu = dir.File($"again-{n}-qemu.qcow2");
            File.Copy(path, qemu);
            List<Op> more;
            using (var runner = OurRunner.OpenFile(path, Api.Sync))
            {
                more = Scenarios.Followup(runner.Image.Size, 4096, (int)n);
                runner.ApplyAll(more);
            }
            QemuTools.Apply(qemu, more, dir);
            QemuTools.AssertNoCorruption(path);
            QemuTools.AssertSameContent(path, qemu);
        }
    }
}
