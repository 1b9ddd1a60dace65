using QcowTier.Tests.Infrastructure;
using QcowTier.Tests.Interop.Support;

namespace QcowTier.Tests.Snapshots;

/// <summary>Random sequences of writes, zeroes, discards and snapshot operations against an in-memory model.</summary>
public sealed class SnapshotModelTests
{
    [Theory]
    [InlineData(1, 512, false)]
    [InlineData(2, 4096, false)]
    [InlineData(3, 512, true)]
    [InlineData(4, 65536, false)]
    public void Random_sequences_match_the_model_and_qemu(int seed, int clusterSize, bool lazy)
    {
        using var dir = new TempDir();
        var path = dir.File("m.qcow2");
        var size = clusterSize * 200L;
        var rng = new Random(seed);
        var active = new byte[size];
        var snaps = new Dictionary<string, byte[]>();
        var img = QcowImage.Create(path, size, new QcowCreateOptions { ClusterSize = clusterSize, LazyRefcounts = lazy });
        try
        {
            var next = 0;
            for (var step = 0; step < 60; step++)
            {
                var choice = rng.Next(100);
                long Off() => rng.NextInt64(size);
                if (choice < 45)
                {
                    var off = Off();
                    var len = (int)Math.Min(size - off, rng.Next(1, clusterSize * 5));
                    var data = new byte[len];
                    rng.NextBytes(data);
                    img.Write(off, data);
                    data.CopyTo(active, off);
                }
                else if (choice < 52)
                {
                    var off = Off();
                    var len = Math.Min(size - off, rng.Next(1, clusterSize * 4));
                    img.WriteZeroes(off, len, mayUnmap: rng.Next(2) == 0);
                    Array.Clear(active, (int)off, (int)len);
                }
                else if (choice < 58)
                {
                    var off = Off() / clusterSize * clusterSize;
                    var len = Math.Min(size - off, clusterSize * rng.Next(1, 4));
                    img.Discard(off, len);
                    Array.Clear(active, (int)off, (int)len); // v3 discards read as zeroes
                }
                else if (choice < 72)
                {
                    var name = "s" + next++;
                    img.CreateSnapshot(name);
                    snaps[name] = (byte[])active.Clone();
                }
                else if (choice < 82 && snaps.Count > 0)
                {
                    var name = snaps.Keys.ElementAt(rng.Next(snaps.Count));
                    img.ApplySnapshot(name);
                    active = (byte[])snaps[name].Clone();
                }
                else if (choice < 92 && snaps.Count > 0)
                {
                    var name = snaps.Keys.ElementAt(rng.Next(snaps.Count));
                    img.DeleteSnapshot(name);
                    snaps.Remove(name);
                }
                else
                {
                    img.Dispose();
                    img = QcowImage.Open(path);
                }
                if (step % 10 == 9)
                {
                    var check = img.Check();
                    check.IsClean.Should().BeTrue($"step {step}: " + string.Join("\n", check.Messages));
                    var buf = new byte[size];
                    img.Read(0, buf);
                    QemuTools.AssertBytesEqual(active, buf, $"step {step}: active disk");
                }
            }
        }
        finally
        {
            img.Dispose();
        }
        Qemu.AssertClean(path);
        QemuTools.AssertBytesEqual(active, QemuTools.ReadRaw(path, dir), "active disk read by QEMU");
        foreach (var (name, content) in snaps)
        {
            QemuTools.AssertBytesEqual(content, SnapshotTests.QemuSnapshotContent(path, name, dir), $"snapshot {name} read by QEMU");
            using var view = QcowImage.Open(path, new QcowOpenOptions { ReadOnly = true, Snapshot = name });
            var buf = new byte[view.Size];
            view.Read(0, buf);
            QemuTools.AssertBytesEqual(content, buf, $"snapshot {name} read by us");
        }
        var list = Qemu.Img("snapshot", "-l", path).EnsureSuccess().StdOut;
        foreach (var name in snaps.Keys)
        {
            list.Should().Contain(name);
        }
    }

    [Fact]
    public void Snapshots_made_by_qemu_are_read_written_applied_and_deleted()
    {
        using var dir = new TempDir();
        var path = dir.File("q.qcow2");
        Qemu.Img("create", "-f", "qcow2", "-o", "cluster_size=4096", path, "8M").EnsureSuccess();
        Qemu.Io("-c", "write -P 1 0 1M", path).EnsureSuccess();
        Qemu.Img("snapshot", "-c", "q1", path).EnsureSuccess();
        Qemu.Io("-c", "write -P 2 512k 1M", "-c", "write -z 0 64k", path).EnsureSuccess();
        Qemu.Img("snapshot", "-c", "q2", path).EnsureSuccess();
        Qemu.Io("-c", "write -P 3 100k 8k", path).EnsureSuccess();
        var q1 = SnapshotTests.QemuSnapshotContent(path, "q1", dir);
        var q2 = SnapshotTests.QemuSnapshotContent(path, "q2", dir);
        using (var view = QcowImage.Open(path, new QcowOpenOptions { ReadOnly = true, Snapshot = "1" }))
        {
            var buf = new byte[view.Size];
            view.Read(0, buf);
            QemuTools.AssertBytesEqual(q1, buf, "snapshot view by id");
        }
        FluentActions.Invoking(() => QcowImage.Open(path, new QcowOpenOptions { ReadOnly = true, Snapshot = "nope" }))
            .Should().Throw<QcowSnapshotNotFoundException>();
        using (var img = QcowImage.Open(path))
        {
            img.GetSnapshots().Select(s => (s.Id, s.Name)).Should().Equal(("1", "q1"), ("2", "q2"));
            img.Write(600 << 10, new byte[70000]);
            img.DeleteSnapshot("q2");
        }
        Qemu.AssertClean(path);
        QemuTools.AssertBytesEqual(q1, SnapshotTests.QemuSnapshotContent(path, "q1", dir), "q1 after our write and delete");
        using (var img = QcowImage.Open(path))
        {
            img.ApplySnapshot("q1");
        }
        Qemu.AssertClean(path);
        QemuTools.AssertBytesEqual(q1, QemuTools.ReadRaw(path, dir), "q1 applied");
        _ = q2;
        // QEMU keeps working on what we left.
        Qemu.Img("snapshot", "-c", "q3", path).EnsureSuccess();
        Qemu.Io("-c", "write -P 4 0 2M", path).EnsureSuccess();
        Qemu.Img("snapshot", "-d", "q1", path).EnsureSuccess();
        Qemu.AssertClean(path);
        QemuTools.AssertBytesEqual(q1, SnapshotTests.QemuSnapshotContent(path, "q3", dir), "q3 = q1");
    }

    [Fact]
    public void Apply_restores_the_snapshot_disk_size()
    {
        using var dir = new TempDir();
        var path = dir.File("r.qcow2");
        using (var img = QcowImage.Create(path, 1 << 20, new QcowCreateOptions { ClusterSize = 512 }))
        {
            img.Write(1000, new byte[] { 1, 2, 3 });
            img.CreateSnapshot("small");
            img.Resize(3 << 20);
            img.Write((2 << 20) + 5, new byte[] { 9 });
            img.CreateSnapshot("big");
            img.ApplySnapshot("small");
            img.Size.Should().Be(1 << 20);
        }
        Qemu.AssertClean(path);
        Qemu.Img("info", path).EnsureSuccess().StdOut.Should().Contain("virtual size: 1 MiB");
        using (var img = QcowImage.Open(path))
        {
            img.ApplySnapshot("big");
            img.Size.Should().Be(3 << 20);
            var b = new byte[1];
            img.Read((2 << 20) + 5, b);
            b[0].Should().Be(9);
        }
        Qemu.AssertClean(path);
    }

    [Fact]
    public void Tiered_images_refuse_snapshots_by_type_and_attach_refuses_images_with_snapshots()
    {
        using var dir = new TempDir();
        var path = dir.File("t.qcow2");
        using (var img = QcowImage.Create(path, 16 << 20, new QcowCreateOptions { Tier = new QcowTierOptions { DataFile = "t.hdd" } }))
        {
            FluentActions.Invoking(() => img.CreateSnapshot("x")).Should().Throw<QcowUnsupportedFeatureException>().Which.Field.Should().Be("nb_snapshots");
        }
        var plain = dir.File("p.qcow2");
        using (var img = QcowImage.Create(plain, 16 << 20))
        {
            img.CreateSnapshot("x");
            FluentActions.Invoking(() => img.AttachTier(new QcowTierOptions { DataFile = "p.hdd" })).Should().Throw<QcowUnsupportedFeatureException>();
        }
        Qemu.AssertClean(plain);
    }
}

/// <summary>Snapshot operations while other threads write: writes wait for them, nothing is lost or torn.</summary>
public sealed class SnapshotConcurrencyTests
{
    [Fact]
    public async Task Create_and_delete_while_writers_run_leave_a_clean_image_and_consistent_snapshots()
    {
        using var dir = new TempDir();
        var path = dir.File("c.qcow2");
        const int cs = 4096;
        const int writers = 4;
        const long size = writers * 64L * cs;
        using (var img = QcowImage.Create(path, size, new QcowCreateOptions { ClusterSize = cs }))
        {
            using var stop = new CancellationTokenSource();
            // Each writer owns a region and writes its own counter into every cluster of it, in order:
            // a snapshot must show, per region, clusters holding n+1 then n (a cut through one pass), never a torn cluster.
            var tasks = Enumerable.Range(0, writers).Select(w => Task.Run(() =>
            {
                var buf = new byte[cs];
                for (byte pass = 1; !stop.IsCancellationRequested && pass < 250; pass++)
                {
                    Array.Fill(buf, pass);
                    for (var c = 0; c < 64; c++)
                    {
                        img.Write((w * 64L + c) * cs, buf);
                    }
                }
            })).ToArray();
            for (var i = 0; i < 6; i++)
            {
                img.CreateSnapshot("s" + i);
                if (i % 2 == 1)
                {
                    img.DeleteSnapshot("s" + (i - 1));
                }
            }
            stop.Cancel();
            await Task.WhenAll(tasks);
            img.Check().IsClean.Should().BeTrue();
        }
        Qemu.AssertClean(path);
        foreach (var name in new[] { "s1", "s3", "s5" })
        {
            var content = SnapshotTests.QemuSnapshotContent(path, name, dir);
            for (var w = 0; w < writers; w++)
            {
                var values = Enumerable.Range(0, 64).Select(c =>
                {
                    var cluster = content.AsSpan((int)((w * 64L + c) * cs), cs);
                    cluster.IndexOfAnyExcept(cluster[0]).Should().Be(-1, $"{name}: cluster {c} of writer {w} is not torn");
                    return cluster[0];
                }).ToList();
                // Non-increasing along the region, and at most one step: the snapshot cut one pass.
                for (var c = 1; c < 64; c++)
                {
                    values[c].Should().BeLessThanOrEqualTo(values[c - 1], $"{name}, writer {w}, cluster {c}");
                }
                (values[0] - values[63]).Should().BeLessThanOrEqualTo(1, $"{name}, writer {w}");
            }
        }
    }
}

/// <summary>QEMU's overlap check covers the snapshot table, inactive L1 tables and the bitmap directory: a damaged entry pointing there is refused.</summary>
public sealed class SnapshotOverlapTests
{
    [Theory]
    [InlineData("snapshot-table")]
    [InlineData("inactive-l1")]
    public void A_write_through_an_entry_pointing_at_snapshot_metadata_is_refused(string target)
    {
        using var dir = new TempDir();
        var path = dir.File("o.qcow2");
        Qemu.Img("create", "-f", "qcow2", path, "4M").EnsureSuccess();
        Qemu.Io("-c", "write -P 1 0 64k", path).EnsureSuccess();
        Qemu.Img("snapshot", "-c", "s", path).EnsureSuccess();
        Qemu.Io("-c", "write -P 2 0 64k", path).EnsureSuccess(); // the active table and cluster are copies now
        var img = new QcowTier.Tests.Check.RawImage(path);
        var l2 = (long)(img.ReadU64(img.L1Offset) & 0x00fffffffffffe00UL);
        long victim;
        using (var ro = QcowImage.Open(path, new QcowOpenOptions { ReadOnly = true }))
        {
            var h = ro.Core.Header;
            victim = target == "snapshot-table"
                ? h.SnapshotsOffset
                : QcowTier.Format.SnapshotHeader.ReadTable(ro.Core.File, h, out _)[0].L1TableOffset;
        }
        img.WriteU64(l2, (ulong)victim | (1UL << 63));
        var before = File.ReadAllBytes(path).AsSpan((int)victim, 512).ToArray();
        using (var rw = QcowImage.Open(path))
        {
            FluentActions.Invoking(() => rw.Write(0, new byte[512])).Should().Throw<QcowCorruptImageException>()
                .Which.Message.Should().Contain("snapshot table or inactive L1 table");
        }
        File.ReadAllBytes(path).AsSpan((int)victim, 512).ToArray().Should().Equal(before, "the metadata was not overwritten");
    }
}
