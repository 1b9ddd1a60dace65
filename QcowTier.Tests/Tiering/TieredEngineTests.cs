using QcowTier.Tests.Infrastructure;
using QcowTier.Tests.Tiering.Support;

namespace QcowTier.Tests.Tiering;

/// <summary>
/// The engine on tiered images holding data on both tiers, driven with random guest operations
/// and compared with an in-memory model after every reopen; at the end the image is detached and
/// handed to qemu-img, which must find it clean and equal to the model.
/// </summary>
public sealed class TieredEngineTests
{
    public static TheoryData<int, int, int, StorageTier, int, int, int> Cases() => new()
    {
        // clusterSize, refcountBits, size (KiB), default tier, SSD budget (% of the disk, 0 = none), operations, seed
        { 512, 16, 2048, StorageTier.Ssd, 25, 700, 1 },
        { 512, 64, 3072, StorageTier.Hdd, 0, 500, 2 },   // 64-bit refcounts: the HDD refcount table outgrows one cluster
        { 4096, 16, 16384, StorageTier.Ssd, 30, 500, 3 },
        { 4096, 1, 8192, StorageTier.Hdd, 0, 400, 4 },
        { 65536, 16, 65536, StorageTier.Ssd, 25, 300, 5 },
        { 2 << 20, 16, 32768, StorageTier.Ssd, 25, 120, 6 },
        { 2 << 20, 8, 32768, StorageTier.Hdd, 0, 80, 7 },
    };

    [Theory]
    [MemberData(nameof(Cases))]
    public void Random_operations_on_both_tiers_match_the_model(int clusterSize, int refcountBits, int sizeKiB, StorageTier defaultTier, int budgetPercent, int operations, int seed)
    {
        using var dir = new TempDir();
        var path = dir.File("img.qcow2");
        long size = sizeKiB * 1024L;
        var budget = budgetPercent == 0 ? 0 : size * budgetPercent / 100 / clusterSize * clusterSize;
        var rng = new Random(seed);
        var model = new DiskModel(size, clusterSize);
        var ops = new RandomOps(rng, model, Math.Min(3 * clusterSize, 256 << 10));

        var img = QcowImage.Create(path, size, TierKit.Tiered(clusterSize, defaultTier: defaultTier, ssdBudget: budget, refcountBits: refcountBits));
        try
        {
            img.IsTiered.Should().BeTrue();
            Prefill(img, model, rng);
            if (defaultTier == StorageTier.Hdd)
            {
                // Everything landed on HDD: bring a quarter up, so both tiers hold data from the start.
                img.MoveToTier(0, size / 4, StorageTier.Ssd);
            }
            var usage = TierKit.AssertUsageMatchesPlacement(img, "after prefill");
            usage.SsdBytes.Should().BeGreaterThan(0);
            usage.HddBytes.Should().BeGreaterThan(0);

            var reopenEvery = Math.Max(operations / 5, 1);
            for (var i = 1; i <= operations; i++)
            {
                ops.Step(img);
                if (i == operations / 2)
                {
                    // Grow to a size that is not a multiple of the cluster size.
                    var newSize = model.Size + model.Size / 4 + 1536;
                    img.Resize(newSize);
                    model.Resize(newSize);
                }
                if (i % reopenEvery == 0)
                {
                    var before = TierKit.AssertUsageMatchesPlacement(img, "before reopen\n" + ops.Recent);
                    img.Dispose();
                    img = QcowImage.Open(path);
                    img.IsTiered.Should().BeTrue();
                    TierKit.AssertContent(img, model, $"after reopen at operation {i}; recent:\n{ops.Recent}");
                    // The counts kept while writing must equal the ones recounted from the L2 tables.
                    img.GetTierUsage().Should().Be(before, "tier usage counted incrementally must match a fresh count after reopen");
                    TierKit.AssertRefcounts(img, because: $"after reopen at operation {i}; recent:\n{ops.Recent}");
                    img.DefaultTier.Should().Be(defaultTier);
                    img.SsdBudget.Should().Be(budget);
                }
            }
            TierKit.AssertContent(img, model, "at the end; recent:\n" + ops.Recent);
            img.Flush();
            TierKit.AssertRefcounts(img, because: "at the end");
            ops.Moves.Should().BeGreaterThan(0);
            usage = TierKit.AssertUsageMatchesPlacement(img, "at the end");
            usage.SsdBytes.Should().BeGreaterThan(0);
            usage.HddBytes.Should().BeGreaterThan(0);
        }
        finally
        {
            img.Dispose();
        }
        TierKit.DetachAndJudgeWithQemu(path, model, dir);
    }

    private static void Prefill(QcowImage img, DiskModel model, Random rng)
    {
        // About 60% of the disk, in unaligned chunks in random order.
        var chunk = Math.Max(img.ClusterSize * 3 / 2 + 7, 48 << 10);
        var starts = new List<long>();
        for (long p = 0; p < model.Size; p += chunk)
        {
            starts.Add(p);
        }
        foreach (var p in starts.OrderBy(_ => rng.Next()).Take(starts.Count * 3 / 5))
        {
            var data = TierKit.RandomBytes(rng, (int)Math.Min(chunk, model.Size - p));
            img.Write(p, data);
            model.Write(p, data);
        }
    }

    [Fact]
    public void Cache_none_opens_read_and_write_both_tiers()
    {
        using var dir = new TempDir();
        var path = dir.File("img.qcow2");
        const long size = 8 << 20;
        var rng = new Random(11);
        var model = new DiskModel(size, 4096);
        var ops = new RandomOps(rng, model, 20000);
        using (var img = QcowImage.Create(path, size, TierKit.Tiered(4096, ssdBudget: 2 << 20, cache: QcowCacheMode.None)))
        {
            Prefill(img, model, rng);
        }
        var none = new QcowOpenOptions { CacheMode = QcowCacheMode.None };
        for (var round = 0; round < 3; round++)
        {
            using var img = QcowImage.Open(path, none);
            img.IsTiered.Should().BeTrue();
            TierKit.AssertContent(img, model, $"cache=none reopen {round}");
            for (var i = 0; i < 150; i++)
            {
                ops.Step(img);
            }
            img.MoveToTier(0, size / 2, StorageTier.Hdd);
            img.MoveToTier(size / 4, size / 2, StorageTier.Ssd);
            TierKit.AssertContent(img, model, "cache=none before close; recent:\n" + ops.Recent);
        }
        using (var img = QcowImage.Open(path, new QcowOpenOptions { ReadOnly = true }))
        {
            TierKit.AssertContent(img, model, "through the page cache after cache=none writes");
            var usage = TierKit.AssertUsageMatchesPlacement(img);
            usage.SsdBytes.Should().BeGreaterThan(0);
            usage.HddBytes.Should().BeGreaterThan(0);
        }
        TierKit.DetachAndJudgeWithQemu(path, model, dir);
    }

    [Fact]
    public async Task Async_api_on_both_tiers_matches_the_model()
    {
        using var dir = new TempDir();
        var path = dir.File("img.qcow2");
        const long size = 8 << 20;
        var rng = new Random(12);
        var model = new DiskModel(size, 4096);
        var ops = new RandomOps(rng, model, 40000);
        var img = QcowImage.Create(path, size, TierKit.Tiered(4096, ssdBudget: 3 << 20));
        try
        {
            Prefill(img, model, rng);
            for (var i = 1; i <= 400; i++)
            {
                await ops.StepAsync(img);
                if (i % 100 == 0)
                {
                    await img.DisposeAsync();
                    img = QcowImage.Open(path);
                    TierKit.AssertContent(img, model, "after async reopen; recent:\n" + ops.Recent);
                }
            }
            // Many async writers at once, each on its own clusters, while a move runs.
            var writers = Enumerable.Range(0, 8).Select(async w =>
            {
                var r = new Random(100 + w);
                for (var k = 0; k < 40; k++)
                {
                    var cluster = r.Next((int)(size / 4096 / 8)) * 8 + w;
                    var within = r.Next(4096);
                    var data = TierKit.RandomBytes(r, r.Next(1, 4096 - within + 1));
                    var off = cluster * 4096L + within;
                    await img.WriteAsync(off, data);
                    model.Write(off, data);
                    var back = new byte[data.Length];
                    await img.ReadAsync(off, back);
                    back.Should().Equal(data);
                }
            }).ToList();
            writers.Add(Task.Run(() => img.MoveToTier(0, size, StorageTier.Hdd)));
            await Task.WhenAll(writers);
            await img.FlushAsync();
            TierKit.AssertContent(img, model, "after concurrent async writes during a move");
            TierKit.AssertUsageMatchesPlacement(img);
        }
        finally
        {
            await img.DisposeAsync();
        }
        TierKit.DetachAndJudgeWithQemu(path, model, dir);
    }

    /// <summary>
    /// Readers, writers, zeroers, discarders and a flusher run while the same ranges move back and
    /// forth between the tiers. Each writer owns every W-th cluster, so the model stays exact; a
    /// band of clusters nobody writes lets readers check what they read while moves run under them.
    /// </summary>
    [Theory]
    [InlineData(4096, false)]
    [InlineData(512, true)]
    [Trait("Category", "Heavy")]
    public async Task Concurrent_io_during_moves_of_the_same_ranges_keeps_the_content(int clusterSize, bool useAsync)
    {
        using var dir = new TempDir();
        var path = dir.File("img.qcow2");
        long size = clusterSize * 2048L;
        var model = new DiskModel(size, clusterSize);
        var rng = new Random(clusterSize);
        const int writersCount = 4;
        const int owners = writersCount + 1; // owner index writersCount: static clusters, only read
        var clusters = (int)(size / clusterSize);
        using var img = QcowImage.Create(path, size, TierKit.Tiered(clusterSize));
        {
            var all = TierKit.RandomBytes(rng, (int)size);
            img.Write(0, all);
            model.Write(0, all);
            img.MoveToTier(size / 2, size / 2, StorageTier.Hdd);
        }
        var stop = 0;
        var started = 0;
        var failures = new System.Collections.Concurrent.ConcurrentQueue<Exception>();

        async Task Guard(Func<Task> body)
        {
            try
            {
                await body();
            }
            catch (Exception e)
            {
                failures.Enqueue(e);
                Volatile.Write(ref stop, 1);
            }
        }

        var tasks = new List<Task>();
        for (var w = 0; w < writersCount; w++)
        {
            var id = w;
            tasks.Add(Task.Run(() => Guard(async () =>
            {
                var r = new Random(1000 + id);
                var n = 0;
                while (Volatile.Read(ref stop) == 0 || n < 50)
                {
                    if (n++ == 1)
                    {
                        Interlocked.Increment(ref started);
                    }
                    var c = r.Next(clusters / owners) * owners + id;
                    if (c >= clusters)
                    {
                        continue;
                    }
                    var clusterStart = (long)c * clusterSize;
                    var roll = r.Next(10);
                    if (roll < 7)
                    {
                        var within = r.Next(clusterSize);
                        var data = TierKit.RandomBytes(r, r.Next(1, clusterSize - within + 1));
                        if (useAsync)
                        {
                            await img.WriteAsync(clusterStart + within, data);
                        }
                        else
                        {
                            img.Write(clusterStart + within, data);
                        }
                        model.Write(clusterStart + within, data);
                    }
                    else if (roll < 9)
                    {
                        var unmap = r.Next(2) == 0;
                        img.WriteZeroes(clusterStart, clusterSize, unmap);
                        model.Zero(clusterStart, clusterSize);
                    }
                    else
                    {
                        img.Discard(clusterStart, clusterSize);
                        model.Discard(clusterStart, clusterSize);
                    }
                    var back = new byte[clusterSize];
                    if (useAsync)
                    {
                        await img.ReadAsync(clusterStart, back);
                    }
                    else
                    {
                        img.Read(clusterStart, back);
                    }
                    TierKit.AssertSame(back, model.Data.AsSpan((int)clusterStart, clusterSize), clusterStart, $"writer {id} reading back its own cluster");
                }
            })));
        }
        for (var rd = 0; rd < 2; rd++)
        {
            var id = rd;
            tasks.Add(Task.Run(() => Guard(async () =>
            {
                var r = new Random(2000 + id);
                var n = 0;
                while (Volatile.Read(ref stop) == 0 || n < 50)
                {
                    if (n++ == 1)
                    {
                        Interlocked.Increment(ref started);
                    }
                    var first = r.Next(clusters);
                    var count = Math.Min(r.Next(1, 3 * owners), clusters - first);
                    var buf = new byte[count * clusterSize];
                    if (useAsync)
                    {
                        await img.ReadAsync((long)first * clusterSize, buf);
                    }
                    else
                    {
                        img.Read((long)first * clusterSize, buf);
                    }
                    for (var c = first; c < first + count; c++)
                    {
                        if (c % owners == writersCount)
                        {
                            var at = (long)c * clusterSize;
                            TierKit.AssertSame(buf.AsSpan((c - first) * clusterSize, clusterSize), model.Data.AsSpan((int)at, clusterSize), at, $"reader {id}: a cluster nobody writes changed under a move");
                        }
                    }
                }
            })));
        }
        tasks.Add(Task.Run(() => Guard(async () =>
        {
            while (Volatile.Read(ref stop) == 0)
            {
                await img.FlushAsync();
                await Task.Yield();
            }
        })));
        var mover = Task.Run(() => Guard(async () =>
        {
            // Start once every writer and reader is under way, so the moves run under their I/O.
            while (Volatile.Read(ref started) < writersCount + 2 && Volatile.Read(ref stop) == 0)
            {
                await Task.Delay(1);
            }
            var r = new Random(3000);
            for (var round = 0; round < 24 && Volatile.Read(ref stop) == 0; round++)
            {
                var target = round % 2 == 0 ? StorageTier.Hdd : StorageTier.Ssd;
                // Whole disk, or a random unaligned range: both directions over the same clusters.
                var off = round % 3 == 0 ? 0 : r.NextInt64(size / 2);
                var len = round % 3 == 0 ? size : r.NextInt64(1, size - off);
                img.MoveToTier(off, len, target);
            }
            Volatile.Write(ref stop, 1);
        }));
        await mover;
        await Task.WhenAll(tasks);
        failures.Should().BeEmpty();
        TierKit.AssertContent(img, model, "after the concurrent run");
        var before = TierKit.AssertUsageMatchesPlacement(img);
        img.Dispose();
        using var again = QcowImage.Open(path, new QcowOpenOptions { ReadOnly = true });
        TierKit.AssertContent(again, model, "after reopen");
        again.GetTierUsage().Should().Be(before);
    }

    /// <summary>Detach while writers and readers keep going: nothing they wrote is lost, and QEMU gets a clean image.</summary>
    [Fact]
    public async Task Detach_under_concurrent_io_keeps_every_write()
    {
        using var dir = new TempDir();
        var path = dir.File("img.qcow2");
        const int cs = 4096;
        const long size = 4 << 20;
        const int writers = 3;
        var model = new DiskModel(size, cs);
        using (var img = QcowImage.Create(path, size, TierKit.Tiered(cs)))
        {
            var all = TierKit.RandomBytes(new Random(5), (int)size);
            img.Write(0, all);
            model.Write(0, all);
            img.MoveToTier(0, size * 3 / 4, StorageTier.Hdd);
            var stop = 0;
            var tasks = Enumerable.Range(0, writers).Select(w => Task.Run(async () =>
            {
                var r = new Random(w);
                for (var n = 0; Volatile.Read(ref stop) == 0 || n < 30; n++)
                {
                    var c = r.Next((int)(size / cs / writers)) * writers + w;
                    var within = r.Next(cs);
                    var data = TierKit.RandomBytes(r, r.Next(1, cs - within + 1));
                    await img.WriteAsync((long)c * cs + within, data);
                    model.Write((long)c * cs + within, data);
                    var back = new byte[cs];
                    await img.ReadAsync((long)c * cs, back);
                    TierKit.AssertSame(back, model.Data.AsSpan(c * cs, cs), (long)c * cs, $"writer {w} during detach");
                }
            })).ToList();
            img.DetachTier();
            Volatile.Write(ref stop, 1);
            await Task.WhenAll(tasks);
            img.IsTiered.Should().BeFalse();
            TierKit.AssertContent(img, model, "after a detach under load");
        }
        File.Exists(dir.File("data.hdd")).Should().BeFalse();
        Qemu.AssertClean(path);
        Qemu.AssertSameContent(model.SaveRaw(dir.File("model.raw")), path, "raw", "qcow2");
    }
}
