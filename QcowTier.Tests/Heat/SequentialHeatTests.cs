using System.Buffers.Binary;
using System.Security.Cryptography;
using CsCheck;
using QcowTier.Heat;
using QcowTier.Tests.Infrastructure;

namespace QcowTier.Tests.Heat;

/// <summary>The heat map's sequential counters: what counts as a stream, and that they persist.</summary>
public sealed class SequentialHeatTests : IDisposable
{
    private readonly TempDir _dir = new();

    public void Dispose() => _dir.Dispose();

    private const int Cluster = 65536;

    [Fact]
    public void A_scan_counts_as_sequential_and_scattered_reads_do_not()
    {
        var map = new HeatMap(64L << 20, Cluster);
        // A scan of the first 16 MiB in 64 KiB reads, twice.
        for (var pass = 0; pass < 2; pass++)
        {
            for (long o = 0; o < 16 << 20; o += Cluster)
            {
                map.RecordRead(o, Cluster);
            }
        }
        // Scattered 4 KiB reads over the last 32 MiB, never adjacent.
        var rnd = new Random(3);
        for (var i = 0; i < 2000; i++)
        {
            map.RecordRead((32L << 20) + rnd.NextInt64(512) * Cluster + 8192, 4096);
        }

        // Each pass starts a new stream: its first megabyte (16 units) pays the seek, the rest is sequential.
        map.GetUnit(0).Sequential.Should().Be(0);
        map.GetUnit(15).Sequential.Should().Be(0);
        map.GetUnit(16).Sequential.Should().Be(2);
        map.GetUnit(100).Reads.Should().Be(2);
        map.GetUnit(100).Sequential.Should().Be(2);
        for (long u = 512; u < 1024; u++)
        {
            map.GetUnit(u).Sequential.Should().Be(0, "scattered reads are random I/O");
        }
    }

    [Fact]
    public void Large_requests_count_past_their_first_megabyte_and_interleaved_streams_are_followed()
    {
        var map = new HeatMap(256L << 20, Cluster);
        map.RecordRead(100L << 20, 4 << 20);
        map.GetUnit((100L << 20) / Cluster).Sequential.Should().Be(0, "a request's first megabyte pays the seek");
        map.GetUnit((102L << 20) / Cluster).Sequential.Should().Be(1, "the rest of a 4 MiB request rides on bandwidth");
        map.RecordRead(200L << 20, 1 << 20);
        map.GetUnit((200L << 20) / Cluster + 15).Sequential.Should().Be(0, "a repeated 1 MiB request is random I/O to an HDD");

        // Four streams interleaved request by request, as several readers (or a VM's readahead) do.
        for (long step = 0; step < 256; step++)
        {
            for (var s = 0; s < 4; s++)
            {
                map.RecordWrite((s * 32L << 20) + step * 8192, 8192);
            }
        }
        for (var s = 0; s < 4; s++)
        {
            var u = map.GetUnit(((s * 32L) << 20) / Cluster + 24);
            u.Writes.Should().Be(8);
            u.Sequential.Should().Be(8);
        }
    }

    [Fact]
    public void Random_workloads_do_not_pay_for_the_sequential_counters()
    {
        var map = new HeatMap(1L << 30, Cluster);
        var rnd = new Random(5);
        for (var i = 0; i < 10_000; i++)
        {
            map.RecordRead(rnd.NextInt64(16384) * Cluster + 4096, 4096);
        }
        map.Pages.Should().OnlyContain(p => p == null || p.Sequential == null);
    }

    [Fact]
    public void Sequential_counts_survive_save_load_merge_and_decay()
    {
        var map = new HeatMap(64L << 20, Cluster, halfLife: TimeSpan.FromHours(1));
        for (long o = 0; o < 8 << 20; o += Cluster)
        {
            map.RecordRead(o, Cluster);
        }
        var path = _dir.File("m.heat");
        map.Save(path);
        var loaded = HeatMap.Load(path);
        for (long u = 0; u < loaded.UnitCount; u++)
        {
            loaded.GetUnit(u).Should().Be(map.GetUnit(u));
        }

        var twice = HeatMap.Load(path);
        twice.Merge(HeatMap.Load(path));
        twice.GetUnit(20).Sequential.Should().Be(2);

        var decayed = HeatMap.Load(path);
        decayed.DecayTo(decayed.DecayedAt + TimeSpan.FromHours(40));
        decayed.GetUnit(20).Sequential.Should().Be(0);
    }

    [Fact]
    public void Version_1_files_still_load_with_no_sequential_counts()
    {
        var map = new HeatMap(64L << 20, Cluster);
        for (long o = 0; o < 4 << 20; o += Cluster)
        {
            map.RecordRead(o, Cluster);
        }
        var path = _dir.File("v2.heat");
        map.Save(path);
        var v1 = _dir.File("v1.heat");
        File.WriteAllBytes(v1, ToVersion1(File.ReadAllBytes(path)));

        var loaded = HeatMap.Load(v1);
        loaded.GetUnit(10).Reads.Should().Be(1);
        loaded.GetUnit(10).Sequential.Should().Be(0);
        loaded.TotalReads.Should().Be(map.TotalReads);
    }

    [Fact]
    public void A_file_of_the_wrong_length_for_its_version_is_refused_by_name()
    {
        var map = new HeatMap(64L << 20, Cluster);
        map.RecordRead(0, 4096);
        var path = _dir.File("m.heat");
        map.Save(path);
        var bytes = File.ReadAllBytes(path);
        BinaryPrimitives.WriteUInt32BigEndian(bytes.AsSpan(HeatMapFile.OffsetVersion), 1); // claims v1, has v2 records
        File.WriteAllBytes(path, bytes);
        FluentActions.Invoking(() => HeatMap.Load(path)).Should().Throw<QcowCorruptImageException>().WithMessage("*page count*");
    }

    /// <summary>Rewrites a version 2 file as version 1: drops each region's sequential bytes and re-checksums.</summary>
    private static byte[] ToVersion1(byte[] v2)
    {
        var regions = (int)BinaryPrimitives.ReadUInt32BigEndian(v2.AsSpan(HeatMapFile.OffsetPageCount));
        var v1 = new byte[HeatMapFile.HeaderLength + regions * HeatMapFile.PageRecordV1];
        v2.AsSpan(0, HeatMapFile.HeaderLength).CopyTo(v1);
        BinaryPrimitives.WriteUInt32BigEndian(v1.AsSpan(HeatMapFile.OffsetVersion), 1);
        for (var r = 0; r < regions; r++)
        {
            v2.AsSpan(HeatMapFile.HeaderLength + r * HeatMapFile.PageRecord, HeatMapFile.PageRecordV1)
                .CopyTo(v1.AsSpan(HeatMapFile.HeaderLength + r * HeatMapFile.PageRecordV1));
        }
        using var sha = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        sha.AppendData(v1, 0, HeatMapFile.OffsetChecksum);
        sha.AppendData(v1, HeatMapFile.HeaderLength, v1.Length - HeatMapFile.HeaderLength);
        sha.GetHashAndReset().CopyTo(v1, HeatMapFile.OffsetChecksum);
        return v1;
    }

    [Fact]
    public void The_radix_sort_is_a_stable_sort_by_key()
    {
        Gen.UInt[0, 40].Array[0, 500].Select(Gen.Bool).Sample((small, wide) =>
        {
            var rnd = new Random(small.Length);
            var keys = small.Select(k => wide ? (uint)rnd.Next() ^ (k << 28) : k).ToArray();
            var items = Enumerable.Range(0, keys.Length).ToArray();
            var expected = items.OrderBy(i => keys[i]).ToArray(); // LINQ's sort is stable
            var sortedKeys = (uint[])keys.Clone();
            Rebalancer.RadixSort(sortedKeys, items);
            items.Should().Equal(expected);
            sortedKeys.Should().BeInAscendingOrder();
        }, iter: 200, threads: 1);
    }
}
