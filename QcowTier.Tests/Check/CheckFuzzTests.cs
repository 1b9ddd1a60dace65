using QcowTier.Format;
using QcowTier.Tests.Infrastructure;

namespace QcowTier.Tests.Check;

/// <summary>
/// Random damage to the metadata (plausible offsets and refcounts as well as garbage), with our
/// counts held against qemu-img's for each image, and our repair against qemu-img's view of it.
/// </summary>
public sealed class CheckFuzzTests
{
    public static TheoryData<int> Seeds()
    {
        var data = new TheoryData<int>();
        for (var seed = 1; seed <= 24; seed++)
        {
            data.Add(seed);
        }
        return data;
    }

    [Theory]
    [MemberData(nameof(Seeds))]
    public void Random_metadata_damage_is_counted_like_qemu(int seed)
    {
        using var dir = new TempDir();
        var rng = new Random(seed);
        var options = (seed % 4) switch
        {
            0 => "cluster_size=4096",
            1 => "refcount_bits=8",
            2 => "cluster_size=512,refcount_bits=32",
            _ => "",
        };
        // Every fifth image has internal snapshots: shared clusters, refcounts above one.
        var snapshots = seed % 5 == 4;
        var path = snapshots ? CheckSnapshotBitmapTests.BuildWithSnapshots(dir) : CheckDamageTests.BuildBase(dir, options);
        var img = new RawImage(path);
        var damages = 1 + rng.Next(4);
        var log = new List<string>();
        for (var i = 0; i < damages; i++)
        {
            log.Add(Damage(img, rng));
        }
        var because = string.Join("; ", log);

        var qemu = CheckHarness.Qemu(CheckHarness.Copy(dir, path, "q.qcow2"));
        var ours = CheckHarness.Ours(CheckHarness.Copy(dir, path, "o.qcow2"));
        ours.ShouldMatch(qemu, because);

        // Repairing must leave what qemu-img then sees, and never more corruptions than before.
        var repaired = CheckHarness.Copy(dir, path, "r.qcow2");
        var mode = seed % 3 == 0 ? QcowRepairMode.Leaks : QcowRepairMode.All;
        // The engine opens images with snapshots read-only only: repair those with the checker directly.
        var result = snapshots ? CheckHarness.OursDirect(repaired, mode) : CheckHarness.Ours(repaired, mode);
        var after = CheckHarness.Qemu(repaired);
        var theirs = CheckHarness.Copy(dir, path, "t.qcow2");
        var qemuRepair = CheckHarness.Qemu(theirs, mode == QcowRepairMode.Leaks ? "leaks" : "all");
        because += $"\nbefore: {qemu}\nours: {CheckHarness.Describe(result)}\nafter: {after}\nqemu-img's own repair: {qemuRepair}";
        if (qemuRepair.HasReport || result.ExitCode != 1)
        {
            after.HasReport.Should().BeTrue(because);
            result.Corruptions.Should().Be((int)after.Corruptions, because);
            result.Leaks.Should().Be((int)after.Leaks, because);
            result.CheckErrors.Should().Be((int)after.CheckErrors, because);
        }
        after.Corruptions.Should().BeLessThanOrEqualTo(Math.Max(qemu.Corruptions, 0), because);
    }

    private static string Damage(RawImage img, Random rng)
    {
        var cs = img.ClusterSize;
        var clusters = (img.Length + cs - 1) / cs;
        ulong PlausibleOffset() => (ulong)(rng.Next(4) switch
        {
            0 => rng.NextInt64(0, clusters) * cs,
            1 => rng.NextInt64(0, clusters + 4) * cs + 512 * rng.Next(1, 4),
            2 => (clusters + rng.Next(1, 1000)) * cs,
            _ => rng.NextInt64(0, clusters * cs),
        });
        switch (rng.Next(7))
        {
            case 0:
                {
                    var at = img.L1EntryOffset(0);
                    var v = rng.Next(3) == 0 ? (ulong)rng.NextInt64() : PlausibleOffset() | (rng.Next(2) == 0 ? ClusterLayout.Copied : 0);
                    img.WriteU64(at, v);
                    return $"L1[0]={v:x}";
                }
            case 1:
            case 2:
                {
                    var guest = rng.Next(4) switch { 0 => rng.Next(16), 1 => 32L, 2 => 160L, _ => 480L };
                    if (img.L1Entry(0) == 0 || (img.L1Entry(0) & ClusterLayout.L1OffsetMask) >= (ulong)img.Length)
                    {
                        return "skipped (no L2)";
                    }
                    var l2Bits = img.ClusterBits - 3;
                    if (guest >> l2Bits != 0)
                    {
                        guest &= (1L << l2Bits) - 1;
                    }
                    var at = img.L2EntryOffset(guest);
                    if (at < cs || at >= img.Length)
                    {
                        // Damage is to the metadata, never to the header (both tools would refuse the image).
                        return "skipped (L2 in the header)";
                    }
                    var old = img.ReadU64(at);
                    var v = rng.Next(6) switch
                    {
                        0 => old ^ (1UL << rng.Next(64)),
                        4 => ClusterLayout.Compressed | ((ulong)rng.NextInt64() & ~ClusterLayout.Copied & ~ClusterLayout.Compressed) >> rng.Next(0, 20),
                        1 => PlausibleOffset() | ClusterLayout.Copied,
                        2 => PlausibleOffset() | (rng.Next(2) == 0 ? ClusterLayout.Zero : 0UL),
                        3 => img.L2Entry(rng.Next(16)),
                        _ => (ulong)rng.NextInt64(),
                    };
                    img.WriteU64(at, v);
                    return $"L2[{guest}] {old:x} -> {v:x}";
                }
            case 3:
                {
                    var at = img.RefcountTableEntryOffset(0);
                    var v = rng.Next(3) switch
                    {
                        0 => PlausibleOffset(),
                        1 => img.RefcountTableEntry(0) ^ (1UL << rng.Next(64)),
                        _ => 0UL,
                    };
                    img.WriteU64(at, v);
                    return $"reftable[0]={v:x}";
                }
            default:
                {
                    var cluster = rng.NextInt64(0, clusters);
                    var max = RefcountBlock.MaxValue(img.RefcountOrder);
                    var v = (ulong)rng.Next(0, 4) & max;
                    var block = img.RefcountTableEntry(0);
                    if ((block & 0x1ff) != 0 || block < (ulong)cs || block > (ulong)(img.Length - cs))
                    {
                        return "skipped (no refcount block)";
                    }
                    img.SetRefcount(cluster, v);
                    return $"refcount[{cluster}]={v}";
                }
        }
    }
}
