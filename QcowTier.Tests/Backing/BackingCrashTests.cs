using QcowTier.Tests.Crash;
using QcowTier.Tests.Infrastructure;

namespace QcowTier.Tests.Backing;

/// <summary>
/// Power cuts during copy-on-write from a backing file: every cluster reads either as before (the backing
/// data) or as after (the backing data with the write applied), never the write over zeroes or a torn mix,
/// and the image passes qemu-img check (leaks allowed).
/// </summary>
public sealed class BackingCrashTests
{
    private const int Cluster = 4096;
    private const int Size = 256 * 1024;

    private static byte BaseByte(long offset) => (byte)(offset / 512 % 251 + 1);

    [Fact]
    public void CopyOnWriteSurvivesEveryCutPoint()
    {
        using var dir = new TempDir();
        var basePath = dir.File("base.raw");
        var baseBytes = new byte[Size];
        for (var i = 0; i < Size; i++)
        {
            baseBytes[i] = BaseByte(i);
        }
        File.WriteAllBytes(basePath, baseBytes);
        var topPath = dir.File("top.qcow2");
        QcowImage.Create(topPath, Size, new QcowCreateOptions { ClusterSize = Cluster, BackingFile = "base.raw", BackingFormat = "raw" }).Dispose();
        var initial = File.ReadAllBytes(topPath);
        // Partial writes into distinct clusters (several clusters at once for some), one flush in the middle.
        (long Offset, int Length, byte Value)[] writes = [(100, 200, 0xc1), (3 * Cluster + 4000, 200, 0xc2), (10 * Cluster + 7, 3 * Cluster, 0xc3), (40 * Cluster + 1000, 50, 0xc4)];
        var expectedAfter = (byte[])baseBytes.Clone();
        foreach (var (o, l, v) in writes)
        {
            expectedAfter.AsSpan((int)o, l).Fill(v);
        }
        var total = RunOnce(initial, topPath, writes, long.MaxValue, 0, out _);
        var checkedCuts = 0;
        for (var cut = 1; cut <= total; cut++)
        {
            for (var seed = 0; seed < 2; seed++)
            {
                var crashed = RunOnce(initial, topPath, writes, cut, seed, out var bytes);
                _ = crashed;
                var path = dir.File($"crashed-{cut}-{seed}.qcow2");
                File.WriteAllBytes(path, bytes);
                var check = Qemu.Img("check", "-f", "qcow2", path);
                check.ExitCode.Should().BeOneOf([0, 3], $"cut at write {cut}: {check.StdOut}{check.StdErr}");
                using (var image = QcowImage.Open(path, new QcowOpenOptions { ReadOnly = true }))
                {
                    var content = new byte[Size];
                    image.Read(0, content);
                    for (var c = 0; c < Size; c += Cluster)
                    {
                        var got = content.AsSpan(c, Cluster);
                        (got.SequenceEqual(baseBytes.AsSpan(c, Cluster)) || got.SequenceEqual(expectedAfter.AsSpan(c, Cluster)))
                            .Should().BeTrue($"cluster at {c} after a cut at write {cut} (seed {seed}) must be old or new");
                    }
                }
                File.Delete(path);
                checkedCuts++;
            }
        }
        checkedCuts.Should().BeGreaterThan(10);
    }

    /// <summary>Runs the writes over a fault-injecting copy of the top image; returns the number of storage writes made.</summary>
    private static long RunOnce(byte[] initial, string name, (long Offset, int Length, byte Value)[] writes, long cutAt, int seed, out byte[] crashed)
    {
        var storage = new FaultInjectingStorage(initial, name);
        var image = QcowImage.OpenOn(storage, new QcowOpenOptions { L2CacheSize = 2 * Cluster, RefcountCacheSize = 2 * Cluster, ForceShare = true });
        var start = storage.WriteCount;
        storage.CutAtWrite(cutAt == long.MaxValue ? long.MaxValue : cutAt);
        try
        {
            for (var i = 0; i < writes.Length; i++)
            {
                var (o, l, v) = writes[i];
                image.Write(o, Enumerable.Repeat(v, l).ToArray());
                if (i == 1)
                {
                    image.Flush();
                }
            }
            image.Dispose();
        }
        catch (Exception e) when (storage.IsCut)
        {
            _ = e;
            try
            {
                image.Dispose();
            }
            catch (Exception e2) when (storage.IsCut)
            {
                _ = e2;
            }
        }
        crashed = storage.CrashImage(new Random(seed), 0.5, tear: true);
        return storage.WriteCount - start;
    }
}
