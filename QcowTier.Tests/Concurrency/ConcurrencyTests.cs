using System.Buffers.Binary;
using System.Collections.Concurrent;
using QcowTier.Tests.Infrastructure;
using QcowTier.Tests.Interop.Support;

namespace QcowTier.Tests.Concurrency;

/// <summary>
/// Many threads and tasks, sync and async mixed, on one image: disjoint regions must hold exactly what
/// their owner wrote; overlapping ones must hold, sector by sector, something a writer wrote there (its
/// own last write per writer, never an older one); concurrent reads never see bytes nobody wrote there
/// (they may see a mix of old and new bytes of a sector being written, as the page cache allows); no
/// deadlock; qemu-img check is clean afterwards.
/// </summary>
public sealed class ConcurrencyTests
{
    private const int Sector = 512;
    private static readonly TimeSpan Deadline = TimeSpan.FromSeconds(90);

    /// <summary>A sector tagged with (writer, sequence): 64 copies of the 8-byte tag. Tag 0 is the zero sector.</summary>
    private static void Fill(Span<byte> buffer, ulong tag)
    {
        for (var i = 0; i < buffer.Length; i += 8)
        {
            BinaryPrimitives.WriteUInt64LittleEndian(buffer[i..], tag);
        }
    }

    /// <summary>The tag of a sector, or null when the sector is not uniformly one tag (torn or garbage).</summary>
    private static ulong? TagOf(ReadOnlySpan<byte> sector)
    {
        var tag = BinaryPrimitives.ReadUInt64LittleEndian(sector);
        for (var i = 8; i < sector.Length; i += 8)
        {
            if (BinaryPrimitives.ReadUInt64LittleEndian(sector[i..]) != tag)
            {
                return null;
            }
        }
        return tag;
    }

    private static ulong Tag(int writer, int seq) => ((ulong)(writer + 1) << 32) | (uint)(seq + 1);

    private static void RunWithDeadline(IEnumerable<Task> tasks, string what)
    {
        var all = Task.WhenAll(tasks);
        if (!all.Wait(Deadline))
        {
            throw new Xunit.Sdk.XunitException($"{what}: not finished after {Deadline.TotalSeconds} s (deadlock?)");
        }
        all.GetAwaiter().GetResult(); // rethrow the first failure
    }

    public static TheoryData<int, bool, QcowCacheMode> Configurations() => new()
    {
        { 4096, false, QcowCacheMode.Writeback },
        { 65536, false, QcowCacheMode.None },
        { 512, true, QcowCacheMode.Writeback },
        { 65536, true, QcowCacheMode.Writeback },
    };

    /// <summary>Each worker owns a region: what it reads back is always exactly what it wrote, whatever the others do.</summary>
    [Theory]
    [MemberData(nameof(Configurations))]
    public void DisjointRegionsAreIndependent(int clusterSize, bool lazy, QcowCacheMode cache)
    {
        using var dir = new TempDir();
        var path = dir.File("disjoint.qcow2");
        const int workers = 8;
        const long region = 384 << 10; // not a multiple of 64 KiB: neighbouring regions share clusters
        var size = workers * region;
        var models = new byte[workers][];
        using (var img = QcowImage.Create(path, size, new QcowCreateOptions { ClusterSize = clusterSize, LazyRefcounts = lazy, CacheMode = cache }))
        {
            var tasks = new List<Task>();
            for (var w = 0; w < workers; w++)
            {
                var id = w;
                models[id] = new byte[region];
                var async = id % 2 == 0;
                tasks.Add(Task.Factory.StartNew(
                    () => Worker(img, id, id * region, models[id], async, clusterSize).GetAwaiter().GetResult(),
                    CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default));
            }
            // A flusher racing with everyone.
            var stop = new CancellationTokenSource();
            var flusher = Task.Run(async () =>
            {
                while (!stop.IsCancellationRequested)
                {
                    await img.FlushAsync();
                    img.Flush();
                    await Task.Delay(3);
                }
            });
            RunWithDeadline(tasks, "disjoint workers");
            stop.Cancel();
            RunWithDeadline([flusher], "flusher");

            var all = new byte[size];
            img.Read(0, all);
            for (var w = 0; w < workers; w++)
            {
                QemuTools.AssertBytesEqual(models[w], all.AsSpan((int)(w * region), (int)region), $"region of worker {w}");
            }
        }
        QemuTools.AssertClean(path);
        var raw = QemuTools.ReadRaw(path, dir);
        for (var w = 0; w < workers; w++)
        {
            QemuTools.AssertBytesEqual(models[w], raw.AsSpan((int)(w * region), (int)region), $"qemu-img convert, region of worker {w}");
        }
    }

    private static async Task Worker(QcowImage img, int id, long start, byte[] model, bool async, int cs)
    {
        var rng = new Random(id * 7919 + 1);
        var length = model.Length;
        for (var i = 0; i < 120; i++)
        {
            var off = rng.Next(length);
            var len = Math.Min(length - off, 1 + rng.Next(rng.Next(2) == 0 ? 600 : 3 * cs));
            switch (rng.Next(10))
            {
                case < 5:
                    {
                        var data = new byte[len];
                        rng.NextBytes(data);
                        if (async)
                        {
                            await img.WriteAsync(start + off, data);
                        }
                        else
                        {
                            img.Write(start + off, data);
                        }
                        data.CopyTo(model.AsSpan(off));
                        break;
                    }
                case < 7:
                    {
                        var unmap = rng.Next(2) == 0;
                        if (async)
                        {
                            await img.WriteZeroesAsync(start + off, len, unmap);
                        }
                        else
                        {
                            img.WriteZeroes(start + off, len, unmap);
                        }
                        model.AsSpan(off, len).Clear();
                        break;
                    }
                case 7:
                    {
                        // Discard only whole clusters inside the region (partial ones are left alone by design,
                        // and a neighbour's data may share an edge cluster).
                        var a = (start + off + cs - 1) / cs * cs;
                        var b = (start + off + len) / cs * cs;
                        if (b > a)
                        {
                            if (async)
                            {
                                await img.DiscardAsync(a, b - a);
                            }
                            else
                            {
                                img.Discard(a, b - a);
                            }
                            model.AsSpan((int)(a - start), (int)(b - a)).Clear();
                        }
                        break;
                    }
                default:
                    {
                        var buf = new byte[len];
                        if (async)
                        {
                            await img.ReadAsync(start + off, buf);
                        }
                        else
                        {
                            img.Read(start + off, buf);
                        }
                        QemuTools.AssertBytesEqual(model.AsSpan(off, len), buf, $"worker {id} read-back at {start + off}");
                        break;
                    }
            }
        }
    }

    /// <summary>
    /// Writers hammer the same clusters (allocating, in place, zeroing, discarding) while readers read them.
    /// Every sector ever read is one some writer wrote (or zero); at the end each sector holds, for some writer,
    /// that writer's last write to it.
    /// </summary>
    [Theory]
    [MemberData(nameof(Configurations))]
    public void OverlappingWritesNeverTearOrRegress(int clusterSize, bool lazy, QcowCacheMode cache)
    {
        using var dir = new TempDir();
        var path = dir.File("overlap.qcow2");
        const int writers = 4;
        const int readers = 3;
        const int sectors = 1024; // 512 KiB shared by everyone
        var size = (long)sectors * Sector;
        // For each writer and sector: the sequence of tags it wrote there (0 = zero/discard), in order.
        var history = new List<ulong>[writers, sectors];
        for (var w = 0; w < writers; w++)
        {
            for (var s = 0; s < sectors; s++)
            {
                history[w, s] = [];
            }
        }
        var everWritten = new ConcurrentDictionary<ulong, bool>();
        everWritten[0] = true;

        using (var img = QcowImage.Create(path, size, new QcowCreateOptions { ClusterSize = clusterSize, LazyRefcounts = lazy, CacheMode = cache }))
        {
            var done = 0;
            var tasks = new List<Task>();
            for (var w = 0; w < writers; w++)
            {
                var id = w;
                tasks.Add(Task.Factory.StartNew(async () =>
                {
                    var rng = new Random(100 + id);
                    for (var seq = 0; seq < 150; seq++)
                    {
                        var first = rng.Next(sectors);
                        var count = Math.Min(sectors - first, 1 + rng.Next(rng.Next(2) == 0 ? 4 : 3 * clusterSize / Sector + 2));
                        var kind = rng.Next(10);
                        ulong tag = kind < 7 ? Tag(id, seq) : 0;
                        everWritten[tag] = true;
                        if (kind < 7)
                        {
                            var data = new byte[count * Sector];
                            Fill(data, tag);
                            if (id % 2 == 0)
                            {
                                await img.WriteAsync((long)first * Sector, data);
                            }
                            else
                            {
                                img.Write((long)first * Sector, data);
                            }
                        }
                        else if (kind < 9)
                        {
                            img.WriteZeroes((long)first * Sector, (long)count * Sector, mayUnmap: kind == 8);
                        }
                        else
                        {
                            // Whole clusters only, so that a discard is a zeroing of exactly those sectors.
                            var spc = clusterSize / Sector;
                            var a = (first + spc - 1) / spc * spc;
                            var b = (first + count) / spc * spc;
                            if (b <= a)
                            {
                                continue;
                            }
                            first = a;
                            count = b - a;
                            await img.DiscardAsync((long)first * Sector, (long)count * Sector);
                        }
                        lock (history)
                        {
                            for (var s = first; s < first + count; s++)
                            {
                                history[id, s].Add(tag);
                            }
                        }
                    }
                }, CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default).Unwrap());
            }
            var readerTasks = new List<Task>();
            for (var r = 0; r < readers; r++)
            {
                var id = r;
                readerTasks.Add(Task.Factory.StartNew(async () =>
                {
                    var rng = new Random(500 + id);
                    var buf = new byte[64 << 10];
                    while (Volatile.Read(ref done) == 0)
                    {
                        var first = rng.Next(sectors);
                        var count = Math.Min(sectors - first, 1 + rng.Next(buf.Length / Sector));
                        var span = buf.AsMemory(0, count * Sector);
                        if (id == 0)
                        {
                            await img.ReadAsync((long)first * Sector, span);
                        }
                        else
                        {
                            img.Read((long)first * Sector, span.Span);
                        }
                        // A read racing with a write of the same bytes may see a mix of old and new (the page
                        // cache copies without locking against readers), but every 8-byte word must be one
                        // some writer wrote there: never bytes of another cluster, a stale reused cluster, or garbage.
                        for (var w = 0; w < count * Sector; w += 8)
                        {
                            var word = BinaryPrimitives.ReadUInt64LittleEndian(buf.AsSpan(w));
                            if (!everWritten.ContainsKey(word))
                            {
                                throw new Xunit.Sdk.XunitException($"reader {id}: sector {first + w / Sector} holds 0x{word:x}, which nobody wrote");
                            }
                        }
                    }
                }, CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default).Unwrap());
            }
            try
            {
                RunWithDeadline(tasks, "overlapping writers");
            }
            finally
            {
                Volatile.Write(ref done, 1);
            }
            RunWithDeadline(readerTasks, "readers");

            var all = new byte[size];
            img.Read(0, all);
            AssertFinal(all, history, writers, sectors, "our read");
        }
        QemuTools.AssertClean(path);
        AssertFinal(QemuTools.ReadRaw(path, dir), history, writers, sectors, "qemu-img convert");
    }

    private static void AssertFinal(byte[] all, List<ulong>[,] history, int writers, int sectors, string what)
    {
        for (var s = 0; s < sectors; s++)
        {
            var t = TagOf(all.AsSpan(s * Sector, Sector));
            t.Should().NotBeNull($"{what}: sector {s} is torn");
            var allowed = new HashSet<ulong>();
            var anyWrite = false;
            for (var w = 0; w < writers; w++)
            {
                if (history[w, s].Count > 0)
                {
                    allowed.Add(history[w, s][^1]);
                    anyWrite = true;
                }
            }
            if (!anyWrite)
            {
                allowed.Add(0);
            }
            if (!allowed.Contains(t!.Value))
            {
                throw new Xunit.Sdk.XunitException($"{what}: sector {s} holds tag {t:x}, but the last writes there were {string.Join(", ", allowed.Select(a => a.ToString("x", System.Globalization.CultureInfo.InvariantCulture)))}");
            }
        }
    }

    /// <summary>
    /// Check (and leak repair) while writers allocate: a cluster allocated for a write still in flight is not a
    /// leak, and repairing "leaks" must never free it under the writer.
    /// </summary>
    [Theory]
    [InlineData(QcowRepairMode.None)]
    [InlineData(QcowRepairMode.Leaks)]
    [InlineData(QcowRepairMode.All)]
    public void CheckDuringConcurrentWritesSeesNoLeaksAndRepairsNothingInFlight(QcowRepairMode mode)
    {
        using var dir = new TempDir();
        var path = dir.File("check-race.qcow2");
        const int workers = 4;
        const long region = 512 << 10;
        var models = new byte[workers][];
        var reports = new ConcurrentBag<string>();
        using (var img = QcowImage.Create(path, workers * region, new QcowCreateOptions { ClusterSize = 4096 }))
        {
            var tasks = new List<Task>();
            for (var w = 0; w < workers; w++)
            {
                var id = w;
                models[id] = new byte[region];
                tasks.Add(Task.Factory.StartNew(
                    () => Worker(img, id, id * region, models[id], async: id % 2 == 0, 4096).GetAwaiter().GetResult(),
                    CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default));
            }
            var stop = 0;
            var checker = Task.Factory.StartNew(() =>
            {
                while (Volatile.Read(ref stop) == 0)
                {
                    var r = img.Check(mode);
                    if (r.Corruptions != 0 || r.Leaks != 0 || r.LeaksFixed != 0 || r.CorruptionsFixed != 0)
                    {
                        reports.Add($"{r.Corruptions} corruptions, {r.Leaks} leaks, {r.LeaksFixed} leaks fixed, {r.CorruptionsFixed} corruptions fixed: {string.Join(" | ", r.Messages.Take(5))}");
                    }
                }
            }, CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default);
            try
            {
                RunWithDeadline(tasks, "writers");
            }
            finally
            {
                Volatile.Write(ref stop, 1);
            }
            RunWithDeadline([checker], "checker");
            var all = new byte[workers * region];
            img.Read(0, all);
            for (var w = 0; w < workers; w++)
            {
                QemuTools.AssertBytesEqual(models[w], all.AsSpan((int)(w * region), (int)region), $"region of worker {w}");
            }
        }
        QemuTools.AssertClean(path);
        var raw = QemuTools.ReadRaw(path, dir);
        for (var w = 0; w < workers; w++)
        {
            QemuTools.AssertBytesEqual(models[w], raw.AsSpan((int)(w * region), (int)region), $"qemu-img convert, region of worker {w}");
        }
        reports.Should().BeEmpty("a consistent image being written is consistent at every check");
    }

    /// <summary>The disk grows (moving the L1 table again and again) while workers write, zero, discard and read their regions.</summary>
    [Theory]
    [InlineData(512)]
    [InlineData(4096)]
    public void ResizingWhileWritingKeepsEveryRegion(int clusterSize)
    {
        using var dir = new TempDir();
        var path = dir.File("grow.qcow2");
        const int workers = 4;
        const long region = 256 << 10;
        var models = new byte[workers][];
        long finalSize;
        using (var img = QcowImage.Create(path, workers * region, new QcowCreateOptions { ClusterSize = clusterSize }))
        {
            var tasks = new List<Task>();
            for (var w = 0; w < workers; w++)
            {
                var id = w;
                models[id] = new byte[region];
                tasks.Add(Task.Factory.StartNew(
                    () => Worker(img, id, id * region, models[id], async: id % 2 == 1, clusterSize).GetAwaiter().GetResult(),
                    CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default));
            }
            var grower = Task.Factory.StartNew(() =>
            {
                for (var i = 1; i <= 40; i++)
                {
                    img.Resize(img.Size + (long)clusterSize * 64 * (i % 5 + 1) + 512);
                    // Something in the new space too, in a part nobody else touches.
                    img.Write(img.Size - 700, new byte[] { (byte)i, 1, 2, 3 });
                }
            }, CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default);
            tasks.Add(grower);
            RunWithDeadline(tasks, "workers and grower");
            finalSize = img.Size;
            var all = new byte[workers * region];
            img.Read(0, all);
            for (var w = 0; w < workers; w++)
            {
                QemuTools.AssertBytesEqual(models[w], all.AsSpan((int)(w * region), (int)region), $"region of worker {w}");
            }
            var tail = new byte[4];
            img.Read(finalSize - 700, tail);
            tail.Should().Equal(40, 1, 2, 3);
        }
        QemuTools.AssertClean(path);
        var raw = QemuTools.ReadRaw(path, dir);
        raw.LongLength.Should().Be(finalSize);
        for (var w = 0; w < workers; w++)
        {
            QemuTools.AssertBytesEqual(models[w], raw.AsSpan((int)(w * region), (int)region), $"qemu-img convert, region of worker {w}");
        }
    }

    /// <summary>Everybody allocating the same fresh clusters at once, through the Stream view too: in-flight allocations are waited for, never duplicated.</summary>
    [Fact]
    public void RacingFirstWritesToTheSameClustersAllocateOnce()
    {
        using var dir = new TempDir();
        var path = dir.File("race.qcow2");
        const int cs = 4096;
        const int threads = 6;
        using (var img = QcowImage.Create(path, 1 << 20, new QcowCreateOptions { ClusterSize = cs }))
        {
            for (var round = 0; round < 20; round++)
            {
                var baseOff = (long)round * 12 * cs;
                using var barrier = new Barrier(threads);
                var tasks = Enumerable.Range(0, threads).Select(t => Task.Factory.StartNew(() =>
                {
                    // Each thread writes its own sector in each of 8 shared fresh clusters.
                    var data = new byte[Sector];
                    Fill(data, Tag(t, round));
                    barrier.SignalAndWait();
                    if (t == 0)
                    {
                        using var s = img.AsStream();
                        for (var c = 0; c < 8; c++)
                        {
                            s.Position = baseOff + (long)c * cs + t * Sector;
                            s.Write(data);
                        }
                    }
                    else
                    {
                        for (var c = 0; c < 8; c++)
                        {
                            img.Write(baseOff + (long)c * cs + t * Sector, data);
                        }
                    }
                }, CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default)).ToArray();
                RunWithDeadline(tasks, $"round {round}");
                var buf = new byte[Sector];
                for (var c = 0; c < 8; c++)
                {
                    for (var t = 0; t < threads; t++)
                    {
                        img.Read(baseOff + (long)c * cs + t * Sector, buf);
                        TagOf(buf).Should().Be(Tag(t, round), $"round {round}, cluster {c}, thread {t}: no write was lost to a duplicate allocation");
                    }
                }
            }
        }
        QemuTools.AssertClean(path);
    }

    /// <summary>Discards racing with in-place writes and reads of the same clusters: a freed cluster is never reused while someone still writes it.</summary>
    [Fact]
    public void DiscardsRacingWithWritesLeaveAConsistentImage()
    {
        using var dir = new TempDir();
        var path = dir.File("discard-race.qcow2");
        const int cs = 4096;
        const long size = 256 * cs;
        using (var img = QcowImage.Create(path, size, new QcowCreateOptions { ClusterSize = cs }))
        {
            var writer = Task.Factory.StartNew(() =>
            {
                var rng = new Random(1);
                var data = new byte[cs];
                for (var i = 0; i < 3000; i++)
                {
                    var c = rng.Next(256);
                    Fill(data, Tag(0, i));
                    img.Write((long)c * cs, data);
                }
            }, CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default);
            var discarder = Task.Run(async () =>
            {
                var rng = new Random(2);
                for (var i = 0; i < 1500; i++)
                {
                    var c = rng.Next(256);
                    var len = Math.Min((long)(1 + rng.Next(4)) * cs, size - (long)c * cs);
                    await img.DiscardAsync((long)c * cs, len);
                    if (i % 50 == 0)
                    {
                        await img.FlushAsync();
                    }
                }
            });
            var reader = Task.Run(async () =>
            {
                var rng = new Random(3);
                var buf = new byte[cs];
                for (var i = 0; i < 2000; i++)
                {
                    var c = rng.Next(256);
                    await img.ReadAsync((long)c * cs, buf);
                    for (var w = 0; w < cs; w += 8)
                    {
                        var word = BinaryPrimitives.ReadUInt64LittleEndian(buf.AsSpan(w));
                        if (word != 0 && word >> 32 != 1)
                        {
                            throw new Xunit.Sdk.XunitException($"cluster {c}: 0x{word:x} was never written");
                        }
                    }
                }
            });
            RunWithDeadline([writer, discarder, reader], "discard race");
        }
        QemuTools.AssertClean(path);
    }
}
