using QcowTier.Tests.Infrastructure;
using QcowTier.Tests.Tiering.Support;

namespace QcowTier.Tests.Tiering;

/// <summary>
/// Power cuts during tier moves, attach and detach. Both files (primary and HDD data file) hang on
/// one power line: the cut comes at the N-th write to either, for every N the operation makes.
/// After the cut both files are rebuilt from what survived (only the durable bytes, or those plus a
/// random subset of the unflushed writes) and reopened: every cluster must read exactly what was
/// flushed before the operation began.
/// </summary>
public sealed class TierCrashTests
{
    private const int Cs = 512;

    private sealed record Prepared(TierDisks Disks, DiskModel Model, long MoveOffset, long MoveLength);

    /// <summary>
    /// 512-byte clusters with 64-bit refcounts (a refcount block covers 64 clusters and a one-cluster
    /// table 4096). The moved range X holds 1100 clusters (two batches), interleaved on the source
    /// tier with a range Y that stays, so no two sources are neighbours; ballast on the target tier
    /// makes the move cross 4096 clusters there, so the target's refcount table has to grow.
    /// </summary>
    private static Prepared PrepareMove(string dir, StorageTier target)
    {
        const long size = 8192L * Cs;
        var disks = new TierDisks(Path.Combine(dir, "img.qcow2"));
        var model = new DiskModel(size, Cs);
        var rng = new Random((int)target + 17);
        var source = target == StorageTier.Hdd ? StorageTier.Ssd : StorageTier.Hdd;
        using (var img = disks.Create(size, TierKit.Tiered(Cs, refcountBits: 64)))
        {
            void Put(long off, int len)
            {
                var d = TierKit.RandomBytes(rng, len);
                img.Write(off, d);
                model.Write(off, d);
            }

            img.SetTierPolicy(target, 0);
            Put(0, (target == StorageTier.Hdd ? 3584 : 3200) * Cs);
            img.SetTierPolicy(source, 0);
            const int x = 4096, y = 5300, n = 1100;
            for (var i = 0; i < n; i++)
            {
                // X: mostly whole clusters, some partial (the rest reads as zero).
                if (i % 7 == 3)
                {
                    Put((long)(x + i) * Cs + 100, 200);
                }
                else
                {
                    Put((long)(x + i) * Cs, Cs);
                }
                Put((long)(y + i) * Cs, Cs);
            }
            // Allocated clusters with the zero flag move too (no copy, flag kept).
            for (var i = 5; i < n; i += 50)
            {
                img.WriteZeroes((long)(x + i) * Cs, Cs, mayUnmap: false);
                model.Zero((long)(x + i) * Cs, Cs);
            }
            var tiers = TierKit.ClusterTiers(img);
            tiers.Skip(x).Take(n).Should().OnlyContain(t => t == source);
            tiers.Take(3200).Should().OnlyContain(t => t == target);
            TierKit.AssertContent(img, model);
        }
        return new Prepared(disks, model, 4096L * Cs, 1100L * Cs);
    }

    [Theory]
    [InlineData(StorageTier.Hdd)]
    [InlineData(StorageTier.Ssd)]
    [Trait("Category", "Heavy")]
    public void Power_cut_at_every_write_of_a_move_loses_nothing(StorageTier target)
    {
        using var dir = new TempDir();
        var prepared = PrepareMove(dir.Path, target);
        var model = prepared.Model;

        // A run without a cut: how many writes the move makes, and that it does what it says.
        long total;
        {
            var disks = prepared.Disks.Clone();
            using var img = disks.Open(readOnly: false);
            disks.Line.ArmAt(long.MaxValue);
            uint TargetTable() => target == StorageTier.Hdd ? img.Core.HddRefcounts!.TableClusters : img.Core.Refcounts.TableClusters;
            var tableBefore = TargetTable();
            var result = img.MoveToTier(prepared.MoveOffset, prepared.MoveLength, target);
            total = disks.Line.Writes;
            TargetTable().Should().BeGreaterThan(tableBefore, "the move must make the target's refcount table grow (and move)");
            result.ClustersMoved.Should().Be(1100);
            TierKit.ClusterTiers(img).Skip(4096).Take(1100).Should().OnlyContain(t => t == target);
            TierKit.AssertContent(img, model, "after the uncut move");
        }
        total.Should().BeGreaterThan(1100, "every scattered cluster is copied with its own write");

        var rng = new Random(42);
        for (var n = 1; n <= total; n++)
        {
            var disks = prepared.Disks.Clone();
            var img = disks.Open(readOnly: false);
            disks.Line.ArmAt(n);
            var act = () => img.MoveToTier(prepared.MoveOffset, prepared.MoveLength, target);
            act.Should().Throw<IOException>($"the power is cut at write {n} of {total}");
            Abandon(img);

            Survival[] modes = (n % 3) switch
            {
                0 => [Survival.DropAll, Survival.TornSectors],
                1 => [Survival.DropAll, Survival.RandomSubset],
                _ => [Survival.DropAll],
            };
            foreach (var mode in modes)
            {
                var after = disks.AfterCut(mode, rng);
                var because = $"after a power cut at write {n} of {total} of a move to {target} ({mode})";
                using (var ro = after.Open(readOnly: true))
                {
                    ro.IsTiered.Should().BeTrue();
                    TierKit.AssertContent(ro, model, because);
                    TierKit.AssertUsageMatchesPlacement(ro, because);
                    TierKit.AssertRefcounts(ro, allowLeaks: true, because);
                }
                if (n % 97 == 0 && mode == Survival.DropAll)
                {
                    // Now and then: carry on from the crashed image, finish the move, detach, and let QEMU judge.
                    using (var rw = after.Open(readOnly: false))
                    {
                        rw.MoveToTier(prepared.MoveOffset, prepared.MoveLength, target);
                        TierKit.AssertContent(rw, model, because + ", move redone");
                        rw.DetachTier(deleteDataFile: false);
                        TierKit.AssertContent(rw, model, because + ", detached");
                    }
                    JudgePlain(dir, after.Primary.DurableImage(), model, because);
                }
            }
        }
    }

    /// <summary>Closes an image whose devices are gone (its final flush fails too).</summary>
    private static void Abandon(QcowImage img)
    {
        try
        {
            img.Dispose();
        }
        catch (IOException)
        {
            // The power is off; the object is dropped.
        }
    }

    /// <summary>qemu-img check finds no corruption (leaks are allowed) and the content equals the model.</summary>
    private static void JudgePlain(TempDir dir, byte[] primary, DiskModel model, string because)
    {
        var path = dir.File($"judge-{Guid.NewGuid():N}.qcow2");
        File.WriteAllBytes(path, primary);
        var check = Qemu.Img("check", "-f", "qcow2", path);
        var output = check.StdOut + check.StdErr;
        check.ExitCode.Should().BeOneOf([0, 3], $"qemu-img check may find leaks, nothing else, {because}:\n{output}");
        output.Should().NotContain("ERROR", because);
        var raw = dir.File($"model-{Guid.NewGuid():N}.raw");
        model.SaveRaw(raw);
        Qemu.AssertSameContent(raw, path, "raw", "qcow2");
        File.Delete(path);
        File.Delete(raw);
    }

    /// <summary>
    /// A plain image left by a cut (maybe with a stale TIER extension and leaked clusters) can be tiered
    /// again, under the same data file name: the retry takes over the file the interrupted attach left.
    /// </summary>
    private static void ReattachAfterCut(TierDisks after, DiskModel model, string because)
    {
        using (var rw = after.Open(readOnly: false))
        {
            rw.IsTiered.Should().BeFalse();
            rw.AttachTier(new QcowTierOptions { DataFile = "data.hdd" });
            rw.MoveToTier(0, rw.Size / 2, StorageTier.Hdd);
            TierKit.AssertContent(rw, model, because + ", attached again");
        }
        using var ro = after.Open(readOnly: true);
        ro.IsTiered.Should().BeTrue();
        ro.TierDataFile.Should().EndWith("data.hdd");
        TierKit.AssertContent(ro, model, because + ", attached again and reopened");
        TierKit.AssertRefcounts(ro, allowLeaks: true, because + ", attached again");
    }

    private static (TierDisks Disks, DiskModel Model) PrepareSmall(string dir, bool tiered)
    {
        const long size = 1024L * Cs;
        var disks = new TierDisks(Path.Combine(dir, "img.qcow2"));
        var model = new DiskModel(size, Cs);
        var rng = new Random(tiered ? 3 : 4);
        var options = tiered ? TierKit.Tiered(Cs, ssdBudget: 200L * Cs) : new QcowCreateOptions { ClusterSize = Cs };
        using (var img = disks.Create(size, options))
        {
            void Put(long off, int len)
            {
                var d = TierKit.RandomBytes(rng, len);
                img.Write(off, d);
                model.Write(off, d);
            }

            Put(0, 150 * Cs);
            Put(300L * Cs + 77, 100 * Cs);
            Put(700L * Cs, 20 * Cs);
            img.WriteZeroes(710L * Cs, 4 * Cs, mayUnmap: false);
            model.Zero(710L * Cs, 4 * Cs);
            if (tiered)
            {
                img.PinTier(900L * Cs, 50L * Cs, StorageTier.Hdd);
                Put(890L * Cs, 40 * Cs);
                img.MoveToTier(0, 30L * Cs, StorageTier.Hdd);
                var usage = img.GetTierUsage();
                usage.SsdBytes.Should().BeGreaterThan(0);
                usage.HddBytes.Should().BeGreaterThan(0);
            }
        }
        return (disks, model);
    }

    [Fact]
    public void Power_cut_during_attach_leaves_a_plain_or_tiered_image_with_the_content()
    {
        using var dir = new TempDir();
        var (prepared, model) = PrepareSmall(dir.Path, tiered: false);
        var hddPath = Path.Combine(dir.Path, "data.hdd");
        long total;
        {
            var disks = prepared.Clone();
            using var img = disks.Open(readOnly: false);
            disks.Line.ArmAt(long.MaxValue);
            img.AttachTier(new QcowTierOptions { DataFile = "data.hdd" });
            total = disks.Line.Writes;
            img.IsTiered.Should().BeTrue();
            img.TierDataFile.Should().Be(hddPath);
        }
        total.Should().BeGreaterThan(3);
        var rng = new Random(7);
        var sawPlain = false;
        var sawTiered = false;
        for (var n = 1; n <= total; n++)
        {
            var disks = prepared.Clone();
            var img = disks.Open(readOnly: false);
            disks.Line.ArmAt(n);
            var act = () => img.AttachTier(new QcowTierOptions { DataFile = "data.hdd" });
            act.Should().Throw<IOException>();
            Abandon(img);
            foreach (var mode in new[] { Survival.DropAll, Survival.RandomSubset, Survival.RandomSubset })
            {
                var after = disks.AfterCut(mode, rng);
                var because = $"after a power cut at write {n} of {total} of an attach ({mode})";
                bool tiered;
                using (var ro = after.Open(readOnly: true))
                {
                    tiered = ro.IsTiered;
                    TierKit.AssertContent(ro, model, because);
                    TierKit.AssertRefcounts(ro, allowLeaks: true, because);
                }
                if (tiered)
                {
                    sawTiered = true;
                    using var rw = after.Open(readOnly: false);
                    rw.MoveToTier(0, rw.Size, StorageTier.Hdd);
                    TierKit.AssertContent(rw, model, because + ", everything moved to HDD");
                    rw.DetachTier(deleteDataFile: false);
                }
                else
                {
                    sawPlain = true;
                }
                JudgePlain(dir, after.Primary.DurableImage(), model, because);
                if (!tiered)
                {
                    ReattachAfterCut(after, model, because);
                }
            }
        }
        sawPlain.Should().BeTrue();
        // Setting bit 63 is the attach's last write: a cut at any write leaves a plain image (tiered is covered by the uncut run).
        sawTiered.Should().BeFalse();
    }

    [Fact]
    public void Power_cut_during_detach_leaves_a_plain_or_tiered_image_with_the_content()
    {
        using var dir = new TempDir();
        var (prepared, model) = PrepareSmall(dir.Path, tiered: true);
        long total;
        {
            var disks = prepared.Clone();
            using var img = disks.Open(readOnly: false);
            disks.Line.ArmAt(long.MaxValue);
            img.DetachTier(deleteDataFile: false);
            total = disks.Line.Writes;
            img.IsTiered.Should().BeFalse();
        }
        total.Should().BeGreaterThan(5);
        var rng = new Random(8);
        var sawPlain = false;
        var sawTiered = false;
        for (var n = 1; n <= total; n++)
        {
            var disks = prepared.Clone();
            var img = disks.Open(readOnly: false);
            disks.Line.ArmAt(n);
            var act = () => img.DetachTier(deleteDataFile: false);
            act.Should().Throw<IOException>();
            Abandon(img);
            foreach (var mode in new[] { Survival.DropAll, Survival.RandomSubset, Survival.RandomSubset })
            {
                var after = disks.AfterCut(mode, rng);
                var because = $"after a power cut at write {n} of {total} of a detach ({mode})";
                bool tiered;
                using (var ro = after.Open(readOnly: true))
                {
                    tiered = ro.IsTiered;
                    TierKit.AssertContent(ro, model, because);
                    TierKit.AssertRefcounts(ro, allowLeaks: true, because);
                }
                if (tiered)
                {
                    sawTiered = true;
                    using var rw = after.Open(readOnly: false);
                    rw.DetachTier(deleteDataFile: false);
                    TierKit.AssertContent(rw, model, because + ", detach redone");
                }
                else
                {
                    sawPlain = true;
                }
                JudgePlain(dir, after.Primary.DurableImage(), model, because);
                if (!tiered)
                {
                    ReattachAfterCut(after, model, because);
                }
            }
        }
        sawPlain.Should().BeTrue();
        sawTiered.Should().BeTrue();
    }

    /// <summary>A change of pins writes a new hints table and switches to it with one write: a cut leaves the old or the new pins.</summary>
    [Fact]
    public void Power_cut_during_a_pin_change_leaves_the_old_or_the_new_pins()
    {
        using var dir = new TempDir();
        var (prepared, model) = PrepareSmall(dir.Path, tiered: true);
        List<TierPin> oldPins, newPins;
        long total;
        {
            var disks = prepared.Clone();
            using var img = disks.Open(readOnly: false);
            oldPins = [.. img.GetTierPins()];
            disks.Line.ArmAt(long.MaxValue);
            // 30 pins: the new table takes two 512-byte clusters.
            for (var i = 0; i < 30; i++)
            {
                img.PinTier(i * 4096L, 1024, StorageTier.Ssd);
            }
            total = disks.Line.Writes;
            newPins = [.. img.GetTierPins()];
        }
        oldPins.Should().NotBeEmpty();
        var rng = new Random(9);
        for (var n = 1; n <= total; n++)
        {
            var disks = prepared.Clone();
            var img = disks.Open(readOnly: false);
            disks.Line.ArmAt(n);
            var done = 0;
            var act = () =>
            {
                for (var i = 0; i < 30; i++)
                {
                    img.PinTier(i * 4096L, 1024, StorageTier.Ssd);
                    done++;
                }
            };
            act.Should().Throw<IOException>();
            Abandon(img);
            foreach (var mode in new[] { Survival.DropAll, Survival.RandomSubset })
            {
                var after = disks.AfterCut(mode, rng);
                var because = $"after a power cut at write {n} of {total} of 30 pin changes ({mode})";
                using var ro = after.Open(readOnly: true);
                var pins = ro.GetTierPins();
                // Each PinTier is durable when it returns; the interrupted one may or may not have landed.
                var expectedAtLeast = oldPins.Concat(Enumerable.Range(0, done).Select(i => new TierPin(i * 4096L, 1024, StorageTier.Ssd))).OrderBy(p => p.Start).ToList();
                var expectedAtMost = oldPins.Concat(Enumerable.Range(0, done + 1).Select(i => new TierPin(i * 4096L, 1024, StorageTier.Ssd))).OrderBy(p => p.Start).ToList();
                pins.Should().Match<IReadOnlyList<TierPin>>(p => p.SequenceEqual(expectedAtLeast) || p.SequenceEqual(expectedAtMost), because);
                TierKit.AssertContent(ro, model, because);
                TierKit.AssertRefcounts(ro, allowLeaks: true, because);
            }
        }
        newPins.Should().HaveCount(oldPins.Count + 30);
    }

    /// <summary>
    /// Lazy refcounts on a tiered image: a crash leaves the image dirty, and the repair at the next
    /// writable open must rebuild both files' refcounts without losing or mixing up a cluster.
    /// </summary>
    [Fact]
    public void Dirty_lazy_refcount_tiered_image_is_repaired_on_open()
    {
        using var dir = new TempDir();
        const int cs = 4096;
        const long size = 4 << 20;
        var disks = new TierDisks(Path.Combine(dir.Path, "img.qcow2"));
        var model = new DiskModel(size, cs);
        var rng = new Random(1);
        var img = disks.Create(size, new QcowCreateOptions
        {
            ClusterSize = cs,
            LazyRefcounts = true,
            Tier = new QcowTierOptions { DataFile = "data.hdd", SsdBudget = 1 << 20 },
        });
        var d = TierKit.RandomBytes(rng, 3 << 20);
        img.Write(0, d);
        model.Write(0, d);
        img.Discard(100 * cs, 10 * cs);
        model.Discard(100 * cs, 10 * cs);
        img.MoveToTier(2 << 20, 256 << 10, StorageTier.Ssd);
        img.Flush();
        img.Write(3 << 20, TierKit.RandomBytes(rng, 200000)); // never flushed: lost at the cut
        disks.Line.ArmAt(1);
        Abandon(img);
        var after = disks.AfterCut(Survival.DropAll, rng);
        using (var ro = after.Open(readOnly: true))
        {
            TierKit.AssertContent(ro, model, "read-only, before any repair");
        }
        using (var rw = after.Open(readOnly: false))
        {
            TierKit.AssertContent(rw, model, "after the repair at open");
            TierKit.AssertRefcounts(rw, because: "after the repair at open");
            var more = TierKit.RandomBytes(rng, 500000);
            rw.Write(3 << 20, more);
            model.Write(3 << 20, more);
        }
        using var again = after.Open(readOnly: true);
        TierKit.AssertContent(again, model);
        TierKit.AssertRefcounts(again);
    }
}
